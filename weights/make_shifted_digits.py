"""The fine-tuning lab's offline "custom dataset": the bundled digits with a real domain shift
(black ink on a light, textured background, rotated), written as PNGs in the class-per-folder
layout torchvision's ImageFolder reads:

    <out>/train/<digit>/<index>.png    from the train part of weights.digits.split_indices()
    <out>/test/<digit>/<index>.png     from the held-out part (never trained on)

    python -m weights.make_shifted_digits [--out data/shifted-digits] [--size 64] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from weights import digits


def shift(images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(N, 8, 8) digits in [0, 1] -> (N, size, size) uint8: inverted, rotated, on a texture."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # v2.RandomRotation draws from the global generator
    x = digits.upscale(images, size)  # white ink on black, (N, 1, S, S)
    rotate = v2.RandomRotation(degrees=(25, 65))
    x = torch.stack([rotate(img) for img in x])
    ramp = torch.linspace(0, 1, size)
    stripes = 0.5 + 0.5 * torch.sin(ramp[None, :] * 18 + ramp[:, None] * 7)  # a diagonal texture
    background = 0.6 + 0.25 * stripes + 0.08 * torch.rand((len(x), 1, size, size), generator=gen)
    out = background * (1 - x) + 0.05 * x  # dark ink over the light texture
    return (out.clamp(0, 1)[:, 0].numpy() * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/shifted-digits"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, labels = digits.load_arrays()
    for split, idx in zip(("train", "test"), digits.split_indices()):
        shifted = shift(images[idx], args.size, args.seed + (split == "test"))
        for i, arr in zip(idx, shifted):
            folder = args.out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
        print(f"{split}: {len(idx)} images in {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
