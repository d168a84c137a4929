"""`make compare`: the fine-tuning lab, offline, end to end.

1. cam 1.0: the demo weights and model_store/cam.mar (built when missing, see archive.sh)
2. datasets (lab/make_shifted_digits.py): the shifted digits in data/shifted-digits/, and the
   same held-out digits unshifted in data/digits/ (the domain 1.0 was trained on)
3. fine-tune cam.mar's classifier on data/shifted-digits/train (lab/finetune_cam.py)
4. archive the result as version 2.0 of cam in outputs/lab/ (./archive.sh --store outputs/lab
   --version 2.0 -> cam-2.0.mar). Not in model_store/: `load_models=all` would serve it at the
   next `make start`, possibly as cam's default version.
5. a private TorchServe (free loopback ports, empty store: harness/torchserve.py, as in the tests): register
   both archives through the management API, list the versions, make 2.0 the default
6. compare both versions by POST (lab/compare.py) on the shifted test split ->
   outputs/compare.json + outputs/compare.html
7. the same on the unshifted test split (what fine-tuning cost on the original domain); stop

Exit code 1 when the fine-tuned version is not >= 20 accuracy points better on the shifted test split.

    python -m lab.run [--epochs 3] [--threads 1] [--reuse]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from handlers.cam.classifier import CONFIG_NAME
from harness import REPO
from harness.torchserve import TorchServeInstance
from lab import compare, finetune_cam, make_shifted_digits
from weights import build_all

SHIFTED = REPO / "data" / "shifted-digits"
PLAIN = REPO / "data" / "digits"
FINETUNED = REPO / "weights" / "finetuned" / "cam"
STORE = REPO / "model_store"
OUT = REPO / "outputs"
LAB_STORE = OUT / "lab"
GOAL_POINTS = 20.0


def step(name: str, title: str, timings: dict, fn, *args):
    """Runs one step of the lab under a heading; its wall time goes to timings[name]."""
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    result = fn(*args)
    timings[name] = round(time.perf_counter() - start, 1)
    return result


def archive(*args: str) -> None:
    subprocess.run([str(REPO / "archive.sh"), *args, "cam"], cwd=REPO, check=True)


def cam_1_0() -> None:
    build_all.main(["--profile", "demo", "cam"])
    archive()


def datasets() -> None:
    make_shifted_digits.main(["--out", str(SHIFTED)])
    make_shifted_digits.main(["--out", str(PLAIN), "--no-shift"])


def archive_2_0() -> None:
    archive("--store", str(LAB_STORE), "--weights", str(FINETUNED), "--version", "2.0")
    link = LAB_STORE / "cam.mar"
    link.unlink(missing_ok=True)
    link.symlink_to(STORE / "cam.mar")


def register(client) -> None:
    for name in ("cam.mar", "cam-2.0.mar"):
        client.register(name, batch_size=8, max_batch_delay=20)
    client.set_default("cam", "2.0")
    default = client.describe("cam")[0]["modelVersion"]
    for d in client.describe("cam", "all"):
        print(f"cam/{d['modelVersion']}: {d['modelUrl']}, batch size {d['batchSize']}, "
              f"{len(d['workers'])} worker(s){', default' if d['modelVersion'] == default else ''}")


def run(args, timings: dict) -> dict:
    step("cam 1.0", "1. cam 1.0: demo weights, model_store/cam.mar", timings, cam_1_0)
    if not (args.reuse and (SHIFTED / "test").is_dir() and (PLAIN / "test").is_dir()):
        step("datasets", "2. datasets: shifted digits + the same digits unshifted", timings, datasets)
    if not (args.reuse and (FINETUNED / CONFIG_NAME).is_file()):
        code = step("fine-tune", "3. fine-tune from model_store/cam.mar", timings, finetune_cam.main,
                    [str(SHIFTED), "--base", str(STORE / "cam.mar"), "--out", str(FINETUNED),
                     "--epochs", str(args.epochs), "--threads", str(args.threads)])
        if code:
            raise SystemExit(code)
    step("archive 2.0", "4. archive version 2.0", timings, archive_2_0)
    print("\n== 5. private TorchServe: register cam 1.0 and 2.0 (default 2.0)", flush=True)
    start = time.perf_counter()
    with TorchServeInstance(archives=["cam.mar", "cam-2.0.mar"], source_store=LAB_STORE,
                            load_at_start=False) as ts:
        register(ts.client)
        timings["serve + register"] = round(time.perf_counter() - start, 1)
        result = step("compare shifted", "6. compare on the shifted test split: POST /predictions/cam/1.0 "
                      "and /predictions/cam/2.0", timings, lambda: compare.compare(
                          ts.client, compare.labelled_images(SHIFTED), ["1.0", "2.0"], overlays=True))
        plain = step("compare original", "7. compare on the original (unshifted) test split", timings,
                     lambda: compare.compare(ts.client, compare.labelled_images(PLAIN), ["1.0", "2.0"]))
    result["lab"] = {
        "shifted_test": str((SHIFTED / "test").relative_to(REPO)),
        "original_domain": {"folder": str((PLAIN / "test").relative_to(REPO)),
                            **{v: {"accuracy": plain["versions"][v]["accuracy"]} for v in plain["versions"]}},
        "finetuned_weights": str(FINETUNED.relative_to(REPO)),
        "archives": [str((LAB_STORE / n).relative_to(REPO)) for n in ("cam.mar", "cam-2.0.mar")],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for fine-tuning (2 is faster on 2 idle cores, much slower on busy ones)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep existing datasets and fine-tuned weights (skip steps 2-3)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    timings: dict = {}
    result = run(args, timings)
    result["lab"]["timings_seconds"] = {**timings, "total": round(time.perf_counter() - start, 1)}
    compare.print_table(result)
    print(f"\nwrote {compare.write_json(result, OUT / 'compare.json')}")
    print(f"wrote {compare.write_html(result, OUT / 'compare.html')}")
    acc = {v: 100 * result["versions"][v]["accuracy"] for v in ("1.0", "2.0")}
    orig = {v: 100 * result["lab"]["original_domain"][v]["accuracy"] for v in ("1.0", "2.0")}
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["lab"]["timings_seconds"].items()))
    print(f"original digits (unshifted): 1.0 {orig['1.0']:.1f} %, 2.0 {orig['2.0']:.1f} % "
          "(what fine-tuning on the shifted domain alone cost)")
    gain = acc["2.0"] - acc["1.0"]
    print(f"shifted test split: original 1.0 {acc['1.0']:.1f} %, fine-tuned 2.0 {acc['2.0']:.1f} %: "
          f"{gain:+.1f} accuracy points (goal >= +{GOAL_POINTS:.0f}): {'met' if gain >= GOAL_POINTS else 'NOT met'}")
    return 0 if gain >= GOAL_POINTS else 1


if __name__ == "__main__":
    sys.exit(main())
