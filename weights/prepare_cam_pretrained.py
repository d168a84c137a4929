"""Prepare the pretrained-profile weights of the `cam` classifier: torchvision's ImageNet ResNet-50.

Never downloads. Uses the local file of ``torchvision.models.ResNet50_Weights.IMAGENET1K_V2``
(``resnet50-11ad3fa6.pth``), found in this order: ``--weights-file`` (a file, or a directory
holding it), else the ``CAM_WEIGHTS_FILE`` environment variable, else the torch hub cache
(``$TORCH_HOME/hub/checkpoints/``, default ``~/.cache/torch/hub/checkpoints/``). The state dict is
validated by a strict load into ``resnet50(num_classes=1000)`` and written atomically, in the same
layout as the demo weights (see ``build_cam_demo.py``):

    <out>/model.safetensors   <out>/cam_config.json   <out>/calibration/*.png (int8 calibration)

    python -m weights.prepare_cam_pretrained [--out weights/pretrained/cam] [--weights-file PATH]
                                             [--calibration DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run as a file path: make `weights` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torchvision
from PIL import Image

from weights.build_cam_demo import CALIBRATION_COUNT, write_cam_dir
from weights.sha256 import file_sha256

ARCH = "resnet50"
DEFAULT_OUT = "weights/pretrained/cam"
ENV_VAR = "CAM_WEIGHTS_FILE"
WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
FILENAME = os.path.basename(WEIGHTS.url)  # resnet50-11ad3fa6.pth
# torchvision file names carry the first hex digits of the file's sha256.
EXPECTED_SHA256_PREFIX = FILENAME.rsplit("-", 1)[-1].split(".")[0]


class WeightsError(Exception):
    """A problem the user must fix; main() prints it as one line and exits 1."""


def candidate_paths(weights_file: str | None) -> list[Path]:
    """Where to look, in order. An explicit choice (flag, then env var) is the only place looked at."""
    if weights_file:
        chosen = [Path(weights_file)]
    elif os.environ.get(ENV_VAR):
        chosen = [Path(os.environ[ENV_VAR])]
    else:
        return [Path(torch.hub.get_dir()) / "checkpoints" / FILENAME]
    # A directory means "the file is in there".
    return [p / FILENAME if p.is_dir() else p for p in chosen]


def find_weights(weights_file: str | None) -> Path:
    paths = candidate_paths(weights_file)
    for p in paths:
        if p.is_file():
            return p
    checked = ", ".join(str(p) for p in paths)
    raise WeightsError(
        f"{FILENAME} (torchvision ResNet50_Weights.IMAGENET1K_V2) not found; checked: {checked}. "
        f"Nothing is downloaded here: on a machine with network run "
        f"python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V2')\" "
        f"(or fetch {WEIGHTS.url}), copy ~/.cache/torch/hub/checkpoints/{FILENAME} here and pass "
        f"--weights-file PATH, set {ENV_VAR}=PATH, or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )


def load_validated(path: Path) -> torch.nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise WeightsError(f"{path} is not a loadable PyTorch state dict: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a ResNet-50 state dict")
    model = torchvision.models.resnet50(num_classes=len(WEIGHTS.meta["categories"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise WeightsError(f"{path} does not match torchvision resnet50(num_classes=1000): "
                           f"{' '.join(line.strip() for line in first[:3])[:500]}") from e
    return model.eval()


def build_config(path: Path, digest: str) -> dict:
    official = digest.startswith(EXPECTED_SHA256_PREFIX)
    transforms = WEIGHTS.transforms()
    return {
        "arch": ARCH,
        "num_classes": len(WEIGHTS.meta["categories"]),
        "labels": list(WEIGHTS.meta["categories"]),
        "resize": int(transforms.resize_size[0]),  # 232
        "input_size": int(transforms.crop_size[0]),  # 224
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "grayscale": False,
        "background": [255, 255, 255],  # transparency is flattened onto white, as usual for ImageNet
        "target_layer": "layer4",
        "profile": "pretrained",
        "source": (
            f"torchvision ResNet50_Weights.IMAGENET1K_V2 ({WEIGHTS.url}), from local file {path.name}, "
            f"sha256 {digest} ({'matches' if official else 'does NOT match'} the published prefix "
            f"{EXPECTED_SHA256_PREFIX}); ImageNet-1k top-1 "
            f"{WEIGHTS.meta['_metrics']['ImageNet-1K']['acc@1']} % as published by torchvision."
        ),
        "metrics": {},
    }


def calibration_images(folder: str | os.PathLike | None, count: int = CALIBRATION_COUNT) -> list[Image.Image]:
    """The int8 calibration set: the first `count` images (sorted by path, RGB) of `folder`, which
    should hold pictures of the kind the model will serve; without a folder, crops of the two
    photographs scikit-learn bundles (`sklearn.datasets.load_sample_images`: a temple and a
    flower), at three scales and mirrored: offline, but far from ImageNet's variety."""
    if folder is not None:
        exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)[:count]
        if not paths:
            raise WeightsError(f"--calibration {folder}: no PNG/JPEG/WebP/BMP images found")
        return [Image.open(p).convert("RGB") for p in paths]
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:  # (427, 640, 3) uint8 each
        img = Image.fromarray(photo)
        for scale in (1.0, 0.7, 0.5):
            side = int(min(img.size) * scale)
            for left in np.linspace(0, img.width - side, 4).astype(int):
                for top in np.linspace(0, img.height - side, 3).astype(int):
                    crop = img.crop((left, top, left + side, top + side))
                    crops += [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return crops[:: max(1, len(crops) // count)][:count]  # 144 crops: every other one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (replaced atomically)")
    p.add_argument("--weights-file", default=None, metavar="PATH",
                   help=f"{FILENAME} or a directory holding it (default: ${ENV_VAR}, else the torch hub cache)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help=f"int8 calibration images: the first {CALIBRATION_COUNT} pictures of DIR, of the kind the "
                        "model will serve (default: crops of scikit-learn's two sample photographs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = find_weights(args.weights_file)
        model = load_validated(path)
        calibration = calibration_images(args.calibration)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    digest = file_sha256(path)
    config = build_config(path, digest)
    if not digest.startswith(EXPECTED_SHA256_PREFIX):
        print(f"warning: {path} loads as a ResNet-50 but its sha256 does not start with "
              f"{EXPECTED_SHA256_PREFIX}; it is not the published IMAGENET1K_V2 file", file=sys.stderr)
    out = write_cam_dir(args.out, model.state_dict(), config, calibration)
    print(f"wrote {out} from {path} ({config['num_classes']} ImageNet classes, "
          f"resize {config['resize']}, crop {config['input_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
