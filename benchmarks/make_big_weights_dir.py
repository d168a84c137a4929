"""Write a synthetic "large" SD-layout weights directory for the archive-time benchmark.

The `sd15` demo pipeline's files plus `unet/padding.bin`, random bytes up to the requested total
size, so archiving cost can be measured at real-model sizes (SD1.5 fp32 is ~4 GB) without the real
weights. diffusers ignores the extra file when loading. The result is NOT a usable model beyond the
demo's noise images.

    .venv/bin/python -m benchmarks.make_big_weights_dir --out /tmp/big_sd15 --size-gb 2.0
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from weights.atomic import atomic_dir
from weights.build_sd15_demo import build

CHUNK = 16 * 1024 * 1024
PADDING_NAME = "padding.bin"


def dir_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def write_padding(path: Path, nbytes: int) -> None:
    """Stream `nbytes` random bytes to `path` chunk by chunk (never more than CHUNK in memory).

    Random rather than zeros so that a compressing archiver cannot shrink it, like real weights.
    """
    with open(path, "wb") as f, tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=path.name) as bar:
        left = nbytes
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
            bar.update(n)


def make(out: Path, size_gb: float, seed: int = 0) -> int:
    """Build the demo pipeline at `out` and pad it to `size_gb` (10**9 bytes). Returns total bytes."""
    out = Path(out)
    # Padded in a staging dir that replaces `out` at the end: an interrupted run leaves no half-padded dir.
    with atomic_dir(out) as stage:
        build(stage, seed=seed, check=False)
        missing = int(size_gb * 1e9) - dir_bytes(stage)
        if missing > 0:
            write_padding(stage / "unet" / PADDING_NAME, missing)
    return dir_bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--size-gb", type=float, default=2.0, help="total size in GB, 10**9 bytes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size_gb <= 0:
        parser.error("--size-gb must be positive")
    total = make(args.out, args.size_gb, seed=args.seed)
    print(f"wrote {args.out}: {total / 1e9:.3f} GB (demo sd15 pipeline + unet/{PADDING_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
