"""The 8x8 handwritten digits bundled with scikit-learn (no download), as tensors and PIL images.

Every demo model, test and benchmark uses these helpers so that all of them see the digits the
same way: ink is white (255) on a black background, like MNIST, upscaled bilinearly.

    python -m weights.digits OUT_DIR [--count 4]    a few held-out digits as PNGs (make demo's cam inputs)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
LABELS = [str(d) for d in range(NUM_CLASSES)]


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 images in [0, 1] of shape (N, 8, 8), and int64 labels (N,)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


def split_indices(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded train / held-out split of the digit indices."""
    _, labels = load_arrays()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def upscale(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(N, 8, 8) images in [0, 1] -> (N, 1, size, size) float tensor in [0, 1], bilinear."""
    t = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def to_pil(image: np.ndarray | torch.Tensor, size: int) -> Image.Image:
    """One 8x8 digit in [0, 1] -> a grayscale PIL image of size x size (white ink on black)."""
    t = upscale(np.asarray(image)[None], size)[0, 0]
    return Image.fromarray((t.numpy() * 255).round().astype(np.uint8), mode="L")


def write_pngs(folder: Path, count: int = 4, size: int = 64) -> list[Path]:
    """The first `count` held-out digits as folder/digit-<index>-label<label>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_arrays()
    _, test = split_indices()
    paths = []
    for i in test[:count]:
        path = folder / f"digit-{i}-label{labels[i]}.png"
        to_pil(images[i], size).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--count", type=int, default=4, help="how many held-out digits")
    args = parser.parse_args(argv)
    for path in write_pngs(args.out, args.count):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
