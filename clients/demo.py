"""`make demo`: start TorchServe from config.properties, call every served model with the client
scripts, write the results under outputs/, print where they are, and stop the server.

The cam inputs are the PNGs in outputs/inputs/, which `make demo` writes first
(`python -m weights.digits outputs/inputs`: a few held-out digits).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from clients import classify
from clients.api import TorchServeClient

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs"
TORCHSERVE = str(REPO / ".venv" / "bin" / "torchserve")


def demo_inputs(folder: Path) -> list[Path]:
    """The inputs of the cam demo: the digit PNGs `python -m weights.digits` wrote into folder."""
    paths = sorted(folder.glob("digit-*.png"))
    if not paths:
        raise SystemExit(f"no cam inputs in {folder}: `python -m weights.digits {folder}` writes them (make demo does)")
    return paths


def run_clients(models: list[str]) -> list[str]:
    done = []
    if "cam" in models:
        inputs = demo_inputs(OUT / "inputs")
        if classify.main([*map(str, inputs), "--out", str(OUT / "cam"), "--topk", "3"]) != 0:
            raise SystemExit("cam client failed")
        done.append(f"cam: CAM overlays in {OUT / 'cam'} (inputs in {OUT / 'inputs'})")
    for name, module in (("ddpm", "clients.sample"), ("sd15", "clients.generate")):
        if name in models:
            done.append(importlib.import_module(module).demo(OUT / name))
    return done


def main() -> int:
    (REPO / "logs").mkdir(exist_ok=True)
    with open(REPO / "logs" / "torchserve.out", "wb") as log:
        # Workers import the handlers from the archives (no PYTHONPATH into this tree).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
        subprocess.run([TORCHSERVE, "--start", "--ncs", "--ts-config", "config.properties"],
                       cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = TorchServeClient(key_file=REPO / "key_file.json")
        described = client.wait_ready(timeout=600)
        models = sorted({d["modelName"] for d in described})
        print(f"serving: {', '.join(models)}", flush=True)
        done = run_clients(models)
    finally:
        subprocess.run([TORCHSERVE, "--stop"], cwd=REPO, check=False, stdout=subprocess.DEVNULL)
    print("\nDemo outputs:")
    for line in done:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
