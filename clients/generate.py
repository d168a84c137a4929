"""Generate images with the `sd15` model (txt2img; img2img with --image; inpainting with
--image and --mask, white = repaint) and save them as PNGs.

    python -m clients.generate "a lighthouse at dusk" --seed 1 --steps 25 --out outputs/sd15
    python -m clients.generate "oil painting" --image photo.png --strength 0.6
    python -m clients.generate "a red door" --image house.png --mask door-mask.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.api import ServerError, TorchServeClient, encode_file, save_b64_png
from clients.options import add_server_options, client_from
from clients.sample import with_progress


def generate(client: TorchServeClient, prompt: str, out: Path, name: str, **params) -> dict:
    payload = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    for key in ("image", "mask"):
        if payload.get(key) is not None:
            payload[key] = encode_file(payload[key])
    result = with_progress(f"generating ({payload.get('steps', 25)} steps)", lambda: client.predict("sd15", payload))
    paths = [save_b64_png(b, out / f"{name}-{result['seed']}-{i}.png")
             for i, b in enumerate(result["images"]) if b is not None]
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return {**result, "paths": paths}


def demo(out: Path) -> str:
    """What `make demo` runs: txt2img, img2img and inpainting at 64x64 on the demo model."""
    from PIL import Image

    client = TorchServeClient(key_file=Path(__file__).resolve().parents[1] / "key_file.json")
    small = {"steps": 10, "width": 64, "height": 64, "seed": 0}
    t2i = generate(client, "a lighthouse at dusk", out, "txt2img", **small)
    src = t2i["paths"][0]
    mask = out / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    generate(client, "a lighthouse at dawn", out, "img2img", image=src, strength=0.6, **small)
    generate(client, "a red door", out, "inpaint", image=src, mask=mask, **small)
    return f"sd15: txt2img, img2img and inpaint PNGs in {out} (demo model: noise images, a smoke test)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--scheduler", choices=("pndm", "ddim", "euler", "dpm++"))
    parser.add_argument("-n", "--num-images", type=int)
    parser.add_argument("--image", type=Path, help="input image: img2img (or inpainting with --mask)")
    parser.add_argument("--strength", type=float, help="img2img: how much to change the image, (0, 1]")
    parser.add_argument("--mask", type=Path, help="inpainting mask, white = repaint")
    parser.add_argument("--out", type=Path, default=Path("outputs/sd15"))
    add_server_options(parser)
    args = parser.parse_args(argv)
    try:
        result = generate(client_from(args), args.prompt, args.out, "sd15",
                          negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                          width=args.width, height=args.height, seed=args.seed, scheduler=args.scheduler,
                          num_images=args.num_images, image=args.image, strength=args.strength, mask=args.mask)
    except (ServerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in result["paths"]:
        print(path)
    print(f"{result['mode']} {result['width']}x{result['height']}, {result['steps']} steps, seed {result['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
