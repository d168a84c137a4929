"""Makes sure every model has a weights directory for a profile (what `make weights` runs).

demo: builds what is missing under weights/demo/ (cam is trained here in ~1.5 min; the ddpm and
sd15 demo weights are committed because training takes ~15 and ~18 minutes, see
weights/train_ddpm_demo.py and weights/train_sd15_demo.py), plus `sd15-smoke`, the tiny random
Stable Diffusion pipeline the unit tests use for the handler's mechanics.
pretrained: prepares weights/pretrained/ from local files (cam: the torchvision ResNet-50 file),
or for the diffusion models checks the directory given by DDPM_WEIGHTS / SD15_WEIGHTS (or under
weights/pretrained/), downloading from the hub only when HF_HUB_OFFLINE is not set. SD15_WEIGHTS
may also be a single-file checkpoint (weights/single_file.py checks it; archive.sh converts it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from handlers.cam import classifier as cam_model
from handlers.cam.quantize import CALIBRATION_DIR

ROOT = Path(__file__).resolve().parent
HUB_REPOS = {"ddpm": "google/ddpm-cifar10-32", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def build_demo(model: str, out: Path) -> None:
    if model == "cam":
        from weights import build_cam_demo

        build_cam_demo.main(["--out", str(out)])
    elif model == "sd15-smoke":
        from weights import build_sd15_demo

        build_sd15_demo.main(["--out", str(out)])
    else:
        raise SystemExit(f"{out} is missing: the {model} demo weights are committed; restore them with "
                         f"'git checkout weights/demo/{model}' or retrain with 'python -m weights.train_{model}_demo'")


def prepare_pretrained(model: str, out: Path) -> None:
    if model == "cam":
        from weights import prepare_cam_pretrained

        prepare_cam_pretrained.main(["--out", str(out)])
        return
    local = os.environ.get(f"{model.upper()}_WEIGHTS")
    if local and model == "sd15" and Path(local).is_file():
        check_single_file(Path(local))
        return  # archive.sh converts it
    if local:
        if not Path(local, "model_index.json").is_file():
            raise SystemExit(f"{model.upper()}_WEIGHTS={local} is not a diffusers pipeline directory "
                             "(no model_index.json)")
        return  # archive.sh reads it from there
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise SystemExit(
            f"no pretrained {model} weights: put a diffusers directory (e.g. a download of "
            f"{HUB_REPOS[model]}) at {out} or set {model.upper()}_WEIGHTS=/path; or, on a machine "
            "with network, run with HF_HUB_OFFLINE=0 to download it"
        )
    from diffusers import DiffusionPipeline

    print(f"downloading {HUB_REPOS[model]} -> {out}", flush=True)
    DiffusionPipeline.from_pretrained(HUB_REPOS[model]).save_pretrained(out)


def check_single_file(path: Path) -> None:
    """SystemExit with weights/single_file.py's one line when `path` is no SD1.5 single file."""
    from weights import single_file

    try:
        single_file.inspect(path, single_file.config_tree())
    except single_file.Refused as exc:
        raise SystemExit(f"SD15_WEIGHTS={path} {exc}") from None


def add_calibration(out: Path, profile: str) -> None:
    """The int8 calibration set of the profile, into a cam weights directory that lacks one."""
    from weights import build_cam_demo, prepare_cam_pretrained

    images = build_cam_demo.digit_calibration() if profile == "demo" else prepare_cam_pretrained.calibration_images(None)
    build_cam_demo.write_calibration(out, images)
    print(f"weights: added {len(images)} int8 calibration images to {out}")


def is_current(model: str, out: Path) -> bool:
    """The directory exists in the layout today's handler reads (a cam config written before a
    key became required is rebuilt)."""
    if model != "cam":
        return (out / "model_index.json").is_file()
    try:
        cam_model.read_config(out)
    except (OSError, ValueError) as exc:
        if (out / cam_model.CONFIG_NAME).is_file():
            print(f"weights: rebuilding {out}: {exc}")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("demo", "pretrained"), default="demo")
    parser.add_argument("models", nargs="*", default=["cam", "ddpm", "sd15"])
    args = parser.parse_args(argv)
    if args.profile == "demo" and "sd15" in args.models:
        args.models.append("sd15-smoke")
    for model in args.models:
        out = ROOT / args.profile / model
        if is_current(model, out):
            print(f"weights: {out} present")
            if model == "cam" and not (out / CALIBRATION_DIR).is_dir():  # written before int8 cam existed
                add_calibration(out, args.profile)
            continue
        if args.profile == "demo":
            build_demo(model, out)
        else:
            prepare_pretrained(model, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
