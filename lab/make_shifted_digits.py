"""The fine-tuning lab's offline "custom dataset": the bundled digits with a real domain shift
(dark ink on a light, textured background, rotated 25-65 degrees), written as PNGs in the
class-per-folder layout torchvision's ImageFolder reads:

    <out>/train/<digit>/<index>.png    from the train part of weights.digits.split_indices()
    <out>/test/<digit>/<index>.png     from the held-out part (never trained on, here or by the demo model)

Deterministic (seeded); <out> is replaced atomically. --no-shift writes the same folders with
the digits as the demo model was trained on them (the original domain, to measure forgetting).

    python -m lab.make_shifted_digits [--out data/shifted-digits] [--size 64] [--seed 0] [--no-shift]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weights import digits
from weights.atomic import atomic_dir

DEFAULT_OUT = "data/shifted-digits"
DEFAULT_SIZE = 64
MIN_DEG, MAX_DEG = 25.0, 65.0


def shift(images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(N, 8, 8) digits in [0, 1] -> (N, size, size) uint8: rotated, dark ink on a light texture."""
    gen = torch.Generator().manual_seed(seed)
    x = digits.upscale(images, size)  # white ink on black, (N, 1, S, S)
    angles = torch.deg2rad(MIN_DEG + torch.rand(len(x), generator=gen) * (MAX_DEG - MIN_DEG))
    cos, sin, zero = torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ramp = torch.linspace(0, 1, size)
    stripes = 0.5 + 0.5 * torch.sin(ramp[None, :] * 18 + ramp[:, None] * 7)  # a diagonal texture
    background = 0.6 + 0.25 * stripes + 0.08 * torch.rand((len(x), 1, size, size), generator=gen)
    out = background * (1 - x) + 0.05 * x
    return (out.clamp(0, 1)[:, 0].numpy() * 255).round().astype(np.uint8)


def write_split(folder: Path, indices: np.ndarray, images: np.ndarray, labels: np.ndarray,
                size: int, seed: int, shifted: bool = True) -> None:
    """The digits `indices` (shifted unless told otherwise) as folder/<label>/<index>.png."""
    pictures = ([Image.fromarray(a, mode="L") for a in shift(images[indices], size, seed)] if shifted
                else [digits.to_pil(images[i], size) for i in indices])
    for i, picture in zip(indices, pictures):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        picture.save(folder / str(labels[i]) / f"{i}.png")


def build(out: Path, size: int = DEFAULT_SIZE, seed: int = 0, shifted: bool = True) -> dict[str, int]:
    """Writes <out>/train and <out>/test atomically; returns the image count per split."""
    images, labels = digits.load_arrays()
    counts = {}
    with atomic_dir(out) as tmp:
        # Different seeds per split: the test images do not share noise / angles with train ones.
        for k, (split, idx) in enumerate(zip(("train", "test"), digits.split_indices())):
            write_split(tmp / split, idx, images, labels, size, seed * 2 + k, shifted)
            counts[split] = len(idx)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.make_shifted_digits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder (replaced)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image size in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shift", dest="shifted", action="store_false",
                        help="write the original digits (white ink on black, upright) instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = build(args.out, args.size, args.seed, args.shifted)
    print(f"wrote {args.out}: " + ", ".join(f"{split}/ {n} images" for split, n in counts.items())
          + f" in 10 class folders ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
