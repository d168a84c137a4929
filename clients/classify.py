"""Classify images with the `cam` model: prints a top-k table, saves the CAM overlay PNGs.

    python -m clients.classify digit.png [more.png ...] --topk 5 --out outputs/cam
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.api import ServerError, encode_file, save_b64_png
from clients.options import add_server_options, client_from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--target", type=int, help="class index to explain (default: the predicted one)")
    parser.add_argument("--method", default="gradcam", help="gradcam (fast), gradcam++, layercam, scorecam, ...")
    parser.add_argument("--model", default="cam")
    parser.add_argument("--version", help="model version (default: the default version)")
    parser.add_argument("--out", type=Path, default=Path("outputs/cam"), help="folder for overlay PNGs")
    add_server_options(parser)
    args = parser.parse_args(argv)
    client = client_from(args)
    failures = 0
    for path in args.images:
        try:
            payload = {"image": encode_file(path), "topk": args.topk, "method": args.method}
            if args.target is not None:
                payload["target"] = args.target
            result = client.predict(args.model, payload, version=args.version)
        except (ServerError, OSError) as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        overlay = save_b64_png(result["cam"]["overlay"], args.out / f"{path.stem}-cam.png")
        print(f"{path}")
        print(f"  {'rank':>4}  {'index':>5}  {'probability':>11}  label")
        for rank, p in enumerate(result["predictions"], 1):
            print(f"  {rank:>4}  {p['index']:>5}  {p['probability']:>11.4f}  {p['label']}")
        cam = result["cam"]
        print(f"  CAM ({cam['method']}) of class {cam['target']} '{cam['label']}' -> {overlay}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
