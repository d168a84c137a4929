"""`make compare`: the fine-tuning lab, offline, end to end.

1. build the shifted digits dataset (weights/make_shifted_digits.py) in data/shifted-digits/
2. fine-tune the demo cam classifier on its train split (weights/finetune_cam.py)
3. archive the result as version 2.0 of cam (./archive.sh ... --version 2.0 -> cam-2.0.mar)
4. start a private TorchServe (free loopback ports, like the tests), register cam 1.0 and 2.0
   through the management API, make 2.0 the default
5. compare both versions on the shifted test split (clients/compare.py) -> outputs/compare.json
6. stop the server
"""
from __future__ import annotations

import json
import subprocess
import sys

from clients.compare import compare, labelled_images, print_table
from tests.support.torchserve import REPO, TorchServeInstance
from weights import finetune_cam, make_shifted_digits

DATA = REPO / "data" / "shifted-digits"
FINETUNED = REPO / "weights" / "finetuned" / "cam"
OUT = REPO / "outputs" / "compare.json"


def main() -> int:
    if not (DATA / "test").is_dir():
        make_shifted_digits.main(["--out", str(DATA)])
    if not (FINETUNED / "cam_config.json").is_file():
        finetune_cam.finetune(DATA, REPO / "weights" / "demo" / "cam", FINETUNED, epochs=3)
    subprocess.run([str(REPO / "archive.sh"), "--weights", str(FINETUNED), "--version", "2.0", "cam"], check=True)
    with TorchServeInstance(archives=["cam.mar", "cam-2.0.mar"], load_at_start=False) as ts:
        client = ts.client
        for archive in ("cam.mar", "cam-2.0.mar"):
            client.register(archive, batch_size=8, max_batch_delay=20)
        client.set_default("cam", "2.0")
        print("registered:", ", ".join(f"cam/{d['modelVersion']}" for d in client.describe("cam", "all")))
        result = compare(client, labelled_images(DATA), ["1.0", "2.0"])
    print_table(result)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    gain = result["versions"]["2.0"]["accuracy"] - result["versions"]["1.0"]["accuracy"]
    print(f"\nfine-tuned 2.0 vs original 1.0 on the shifted test split: {gain * 100:+.1f} accuracy points "
          f"(goal >= +20); wrote {OUT}")
    return 0 if gain >= 0.20 else 1


if __name__ == "__main__":
    sys.exit(main())
