"""Generate images with the `sd15` model (txt2img; img2img with --image; inpainting with
--image and --mask, white = repaint) and save them as PNGs.

    python -m clients.generate "a red handwritten 7" --seed 1 --steps 25 --out outputs/sd15
    python -m clients.generate "a green 2" --image digit.png --strength 0.9
    python -m clients.generate "a blue 1" --image digit.png --mask right-half.png
    python -m clients.generate "a lighthouse at dusk" --lora my-style --lora film-grain:0.5
(the demo profile's model draws 64x64 digits in red, green, blue, yellow or white; the same
client serves real SD1.5 prompts with PROFILE=pretrained)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.api import ServerError, TorchServeClient, encode_file, save_b64_png
from clients.options import add_server_options, client_from
from clients.progress import streamed


def generate(client: TorchServeClient, prompt: str, out: Path, name: str, preview_dir: Path | None = None,
             **params) -> dict:
    """Streams the request (a step bar; previews saved in `preview_dir` when given)."""
    payload = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    for key in ("image", "mask"):
        if payload.get(key) is not None:
            payload[key] = encode_file(payload[key])
    result = streamed(client, "sd15", payload, f"generating {name}", preview_dir=preview_dir)
    paths = [save_b64_png(b, out / f"{name}-{result['seed']}-{i}.png")
             for i, b in enumerate(result["images"]) if b is not None]
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return {**result, "paths": paths}


DEMO_COLOURS = ("red", "green", "blue", "yellow", "white")


def demo(out: Path) -> str:
    """What `make demo` runs on the demo model (64x64 coloured digits): a grid of digits x colours,
    an img2img and an inpainting example each beside its input, and a negative-prompt pair."""
    import base64
    import io

    from PIL import Image

    from clients.images import tile

    client = TorchServeClient(key_file=Path(__file__).resolve().parents[1] / "key_file.json")

    def draw(name: str, prompt: str, **params) -> Image.Image:
        result = generate(client, prompt, out / "parts", name, **params)
        return Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB")

    def sheet(images: list[Image.Image], path: Path, nrow: int) -> Path:
        img = tile(images, nrow=nrow, padding=2, pad_value=90)
        img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)
        return path

    out.mkdir(parents=True, exist_ok=True)
    cells = [draw(f"{c}-{d}", f"a {c} handwritten {d}", seed=d) for c in DEMO_COLOURS for d in range(10)]
    grid = sheet(cells, out / "digits-by-colour.png", nrow=10)
    seven = cells[DEMO_COLOURS.index("blue") * 10 + 7]
    (out / "parts").mkdir(parents=True, exist_ok=True)
    seven.save(out / "parts" / "input-7.png")
    img2img = draw("img2img", "a yellow handwritten 2", image=out / "parts" / "input-7.png", strength=0.9, seed=1)
    mask = Image.new("L", seven.size, 0)
    mask.paste(255, (seven.width // 2, 0, seven.width, seven.height))
    mask.save(out / "parts" / "mask.png")
    inpaint = draw("inpaint", "a blue handwritten 1", image=out / "parts" / "input-7.png",
                   mask=out / "parts" / "mask.png", seed=2)
    pairs = sheet([seven, img2img, seven, mask.convert("RGB"), inpaint], out / "img2img-and-inpaint.png", nrow=5)
    plain = [draw(f"plain-{s}", "", seed=s) for s in range(10)]
    negative = [draw(f"negative-{s}", "", negative_prompt="a handwritten 3", seed=s) for s in range(10)]
    neg = sheet(plain + negative, out / "negative-prompt.png", nrow=10)
    return (f"sd15: {grid} (rows: {', '.join(DEMO_COLOURS)}; digits 0-9), {pairs} (input 7 -> img2img "
            f"'a yellow 2' at 0.9; input, mask, inpainted 'a blue 1'), {neg} (empty prompt, seeds 0-9: "
            "without / with negative_prompt 'a handwritten 3')")


def lora(text: str) -> dict:
    """NAME or NAME:SCALE (A1111's <lora:NAME:SCALE>) -> the request's {"name", "scale"}."""
    name, _, scale = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": text}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME or NAME:SCALE, e.g. my-style:0.8") from None


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
    parser.add_argument("--lora", type=lora, action="append", metavar="NAME[:SCALE]",
                        help="apply a LoRA of the server's lora_dir (repeatable; describe lists them)")
    parser.add_argument("--out", type=Path, default=Path("outputs/sd15"))
    parser.add_argument("--preview", type=Path, metavar="DIR", help="save the streamed preview PNGs in DIR")
    parser.add_argument("--preview-every", type=int, help="a preview every N steps (server default 5; 0 = none)")
    parser.add_argument("--preview-vae", action="store_true", help="exact previews by the VAE (costs a decode each)")
    add_server_options(parser)
    args = parser.parse_args(argv)
    try:
        result = generate(client_from(args), args.prompt, args.out, "sd15", preview_dir=args.preview,
                          preview_every=args.preview_every, preview_vae=args.preview_vae or None,
                          negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                          width=args.width, height=args.height, seed=args.seed, scheduler=args.scheduler,
                          num_images=args.num_images, image=args.image, strength=args.strength, mask=args.mask,
                          loras=args.lora)
    except (ServerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the request was cancelled on the server (clients/progress.py)
        return 130
    for path in result["paths"]:
        print(path)
    print(f"{result['mode']} {result['width']}x{result['height']}, {result['steps']} steps, seed {result['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
