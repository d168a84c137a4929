"""Draw samples from the `ddpm` model: saves each PNG, a grid, and with --trajectory the GIF of
the denoised estimates along the reverse process.

    python -m clients.sample -n 16 [--steps 10 --scheduler ddpm] --seed 0 --out outputs/ddpm [--trajectory]
                             [--preview outputs/ddpm/previews]

The request is streamed: a bar shows the server's steps and ETA as they happen.
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path

from PIL import Image

from clients.api import ServerError, TorchServeClient, save_b64_png
from clients.images import tile
from clients.options import add_server_options, client_from
from clients.progress import streamed


def grid(images: list[Image.Image], scale: int = 4) -> Image.Image:
    """A grid of the samples with a thin border, enlarged so tiny samples are visible."""
    img = tile(images, nrow=max(1, round(len(images) ** 0.5)), padding=1, pad_value=96)
    return img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)


def sample(client: TorchServeClient, out: Path, num_images: int, steps: int | None = None,
           scheduler: str | None = None, seed: int | None = None, eta: float | None = None,
           trajectory: bool = False, version: str | None = None, preview_dir: Path | None = None,
           preview_every: int | None = None) -> dict:
    """steps / scheduler / eta None: the server's defaults (GET /models/ddpm?customized=true).
    Streams the request: a step bar, and the x0 previews saved in `preview_dir` when given."""
    payload = {"num_images": num_images, "seed": seed, "trajectory": trajectory}
    payload.update({k: v for k, v in (("steps", steps), ("scheduler", scheduler), ("eta", eta),
                                      ("preview_every", preview_every)) if v is not None})
    label = f"{steps} steps ({scheduler})" if steps and scheduler else "the server's default steps"
    result = streamed(client, "ddpm", payload, f"sampling {num_images} x {label}", version, preview_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_b64_png(b, out / f"sample-{result['seed']}-{i}.png") for i, b in enumerate(result["images"])]
    pils = [Image.open(io.BytesIO(base64.b64decode(b))) for b in result["images"]]
    grid(pils).save(out / f"grid-{result['seed']}.png")
    if trajectory:
        (out / f"trajectory-{result['seed']}.gif").write_bytes(base64.b64decode(result["trajectory"]))
    return {"seed": result["seed"], "paths": paths, "grid": out / f"grid-{result['seed']}.png"}


def demo(out: Path) -> str:
    """What `make demo` runs: 16 samples at the server's default scheduler + a grid, and one trajectory GIF."""
    client = TorchServeClient(key_file=Path(__file__).resolve().parents[1] / "key_file.json")
    got = sample(client, out, num_images=16, seed=0)
    sample(client, out, num_images=1, seed=1, steps=20, scheduler="ddpm", trajectory=True,
           preview_dir=out / "previews", preview_every=4)
    return (f"ddpm: 16 samples and {got['grid']}, trajectory GIF {out / 'trajectory-1.gif'}, streamed previews "
            f"in {out / 'previews'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, help="default: the server's (see docs/api/ddpm.schema.json)")
    parser.add_argument("--scheduler", help="ddim, ddpm, dpm++, unipc, euler; default: the server's")
    parser.add_argument("--eta", type=float, help="DDIM only: 0 = deterministic, 1 = DDPM-like noise")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--trajectory", action="store_true", help="also save the x0 trajectory GIF")
    parser.add_argument("--version")
    parser.add_argument("--out", type=Path, default=Path("outputs/ddpm"))
    parser.add_argument("--preview", type=Path, metavar="DIR", help="save the streamed preview PNGs (x0 estimates) in DIR")
    parser.add_argument("--preview-every", type=int, help="a preview every N steps (server default 5; 0 = none)")
    add_server_options(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        got = sample(client_from(args), args.out, args.num_images, args.steps, args.scheduler, args.seed,
                     args.eta, args.trajectory, args.version, args.preview, args.preview_every)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the request was cancelled on the server (clients/progress.py)
        return 130
    print(f"{len(got['paths'])} samples (seed {got['seed']}) in {args.out}, grid {got['grid']}"
          f"{', trajectory GIF' if args.trajectory else ''} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
