"""Train a small LoRA that teaches the `sd15` demo a trait its base model cannot draw.

    .venv/bin/python -m weights.train_sd15_lora --trait rainbow --out weights/demo/sd15/loras/rainbow.safetensors
    .venv/bin/python -m weights.train_sd15_lora --trait italic --out weights/demo/sd15/loras/italic.safetensors

Traits (weights/sd15_captions.py draws their ground truth and judges them):
  * rainbow: the digit in bands of red, yellow, green and blue, top to bottom ("a rainbow handwritten 7");
  * italic: the digit leaning right, every one by the same slant ("an italic handwritten 7").

Why not purple or outlined digits: a LoRA adapts the UNet and the text encoder, never the VAE, and
the demo's VAE draws only what it was trained on, five palette colours in smooth strokes about
8 px wide. A purple digit comes back from its round trip green (mean abs error 54/255, and even
latents optimised against its decoder give red-and-blue speckles, 18/255); a 2-3 px outline of the
strokes, or a square frame around the digit, comes back as coloured smudges (44/255), and the cam
judge reads only about half of the outlined digits even before the round trip. Both traits here stay within the VAE: a rainbow digit is latents spliced along
latent-row boundaries from the digit's latents in four palette colours (what phase 4 of
weights/train_sd15_demo.py taught the decoder to draw), an italic digit the same strokes sheared
(round trip 4.5/255).

The base model is frozen; a rank-r LoRA is trained on the UNet's attention projections, feed-forward
layers, transformer in/out projections and ResNet convolutions, and on the text encoder's
attention and MLP (it has to turn the trait's word, never in the base's captions, into something
the UNet reads). 70 % of each batch are trait pictures with trait captions, 30 % the base's own
pictures and captions (weights/train_sd15_demo.py's caption_sampler) so that prompts without the
trait word keep their digit and colour. 15 % of the trait pictures are captioned empty, so that with
the LoRA on, classifier-free guidance's unconditional branch leans to the trait too: without that,
guidance 7.5 amplified the whole trait difference and deformed the digits (digit adherence at
scale 1 fell to 75 %). Epsilon MSE, DDPM noise and EMA weights, as the base was trained. The
weights are stored in float16, as kohya stores them by default.

Written as rainbow in diffusers/PEFT format (StableDiffusionPipeline.save_lora_weights) and italic
in the kohya / AUTOMATIC1111 format (`lora_unet_*` / `lora_te_*` keys, --format overrides);
`<name>.json` next to the file records how it was trained.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from weights import sd15_captions  # noqa: E402
from weights.atomic import atomic_file  # noqa: E402
from weights.build_sd15_demo import MODEL_MAX_LENGTH  # noqa: E402
from weights.train_sd15_demo import (  # noqa: E402
    caption_sampler,
    encode_dataset,
    end_training,
    epsilon_step,
    show_loss,
    start_training,
    training_images,
)

DEFAULT_FORMAT = {"rainbow": "diffusers", "italic": "kohya"}
UNET_TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2"
TEXT_TARGETS = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trait", required=True, choices=sd15_captions.TRAITS)
    p.add_argument("--out", required=True, help="the LoRA file, <dir>/<name>.safetensors")
    p.add_argument("--base", default="weights/demo/sd15", help="the trained sd15 demo (diffusers layout)")
    p.add_argument("--format", choices=("diffusers", "kohya"), help="default: diffusers for rainbow, kohya for italic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for this tiny model on a shared 2-core box")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha: the update is scaled by alpha / rank")
    p.add_argument("--unet-targets", default=UNET_TARGETS, help="UNet modules (name suffixes) given a LoRA")
    p.add_argument("--text-targets", default=TEXT_TARGETS, help="text encoder modules (name suffixes) given a LoRA")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--trait-share", type=float, default=0.7, help="share of each batch showing the trait")
    p.add_argument("--trait-empty", type=float, default=0.15,
                   help="share of trait pictures captioned empty, so the LoRA's unconditional branch draws the trait too")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--ema-decay", type=float, default=0.999, help="cap of the EMA's decay (it warms up as the base's did)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# data -----------------------------------------------------------------------------------------
def trait_latents(trait: str, vae, gray: np.ndarray, labels: np.ndarray, plain: dict, args) -> dict:
    """Latent mean/std, digit and colour of every training digit showing `trait`."""
    if trait == "italic":
        return encode_dataset(vae, gray, labels, args, render=sd15_captions.render_italic, desc="italic latents")
    # rainbow: latent row r of digit i is row r of digit i's latents in that row's band colour
    n, rows = len(gray), plain["mean"].shape[2]
    band = [sd15_captions.COLOUR_NAMES.index(sd15_captions.rainbow_band(r, rows)) * n for r in range(rows)]
    idx = torch.arange(n)
    splice = {k: torch.cat([plain[k][band[r] + idx, :, r:r + 1] for r in range(rows)], dim=2) for k in ("mean", "std")}
    return {**splice, "digit": plain["digit"][:n], "colour": plain["colour"][:n]}


def trait_caption_sampler(trait: str, tokenizer, empty: float, gen: torch.Generator):
    """(digit, colour) tensors -> (B, 77) token ids of one random caption asking for `trait` each,
    or of the empty caption with probability `empty`."""
    table = [[sd15_captions.trait_captions(trait, d, c) for c in sd15_captions.COLOUR_NAMES] for d in range(10)]
    texts = sorted({"", *(t for row in table for caps in row for t in caps)})
    ids = torch.tensor(tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids)
    index = {t: i for i, t in enumerate(texts)}

    def sample(digit: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(len(digit), generator=gen) < empty
        pick = torch.rand(len(digit), generator=gen)
        rows = []
        for d, c, r, e in zip(digit.tolist(), colour.tolist(), pick.tolist(), drop.tolist()):
            options = table[d][c]
            rows.append(index["" if e else options[int(r * len(options))]])
        return ids[rows]

    return sample


# training -------------------------------------------------------------------------------------
def add_loras(unet, text_encoder, args) -> list[torch.nn.Parameter]:
    """Fresh LoRA adapters ("default") on both models, the rest frozen; returns the trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # gaussian A, zero B: the LoRA starts as the base model
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                                target_modules=args.unet_targets.split(",")))
    text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                                        target_modules=args.text_targets.split(",")))
    return [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]


def train(pipe, data: dict, args, gen: torch.Generator) -> dict:
    from diffusers import DDPMScheduler

    unet, text_encoder = pipe.unet, pipe.text_encoder
    trainable = add_loras(unet, text_encoder, args)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the base's betas, as it was trained
    plain_captions, _ = caption_sampler(pipe.tokenizer, gen)
    trait_captions = trait_caption_sampler(args.trait, pipe.tokenizer, args.trait_empty, gen)
    scale = pipe.vae.config.scaling_factor
    k = int(round(args.batch_size * args.trait_share))
    opt, sched, ema = start_training(trainable, unet, text_encoder, args)
    recent = []

    def draw(part: dict, count: int, captions) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(part["mean"]), (count,), generator=gen)
        z = part["mean"][idx] + part["std"][idx] * torch.randn(part["mean"][idx].shape, generator=gen)
        return z * scale, captions(part["digit"][idx], part["colour"][idx])

    bar = tqdm(range(args.steps), desc=f"lora {args.trait}", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        z_plain, ids_plain = draw(data["plain"], args.batch_size - k, plain_captions)
        z_trait, ids_trait = draw(data["trait"], k, trait_captions)
        z0, ids = torch.cat([z_plain, z_trait]), torch.cat([ids_plain, ids_trait])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen)
        loss = epsilon_step(unet, text_encoder, noise_sched, z0, ids, noise, t, trainable, opt, sched, ema)
        show_loss(bar, recent, loss, 100, step, args.steps, sched)
    bar.close()
    end_training(ema, trainable, unet, text_encoder)
    return {"final_loss": round(float(np.mean(recent)), 5),
            "final_loss_note": "mean epsilon-MSE over the last 100 steps, trait and plain samples together "
                               "(raw weights; EMA weights are saved)",
            "lora_params": sum(p.numel() for p in trainable)}


# saving ---------------------------------------------------------------------------------------
def lora_state(module) -> dict[str, torch.Tensor]:
    """The module's LoRA weights in float16 with PEFT's keys (`<module path>.lora_A.weight` / `.lora_B.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().half().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def kohya_state(unet, text_encoder, alpha: float) -> dict[str, torch.Tensor]:
    """The kohya / AUTOMATIC1111 layout of the LoRA. diffusers reads it (load_lora_weights converts
    it) but has no writer for it, hence this renaming: `lora_unet_` / `lora_te_` and the module
    path with dots as underscores, lora_A -> `.lora_down.weight`, lora_B -> `.lora_up.weight`, and
    the alpha of each module as a scalar `.alpha` (the update is scaled by alpha / rank). The text
    encoder's modules are named as in transformers 4's CLIPTextModel, under `text_model.`, as
    kohya's files have them (diffusers reads both spellings)."""
    out = {}
    for prefix, module in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        for key, value in lora_state(module).items():
            path, kind = key.rsplit(".lora_", 1)
            if module is text_encoder and not path.startswith("text_model."):
                path = "text_model." + path
            name = prefix + path.replace(".", "_")
            out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save(pipe, out: Path, fmt: str, alpha: float) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    with atomic_file(out) as tmp:
        if fmt == "diffusers":
            StableDiffusionPipeline.save_lora_weights(
                tmp.parent, weight_name=tmp.name,
                unet_lora_layers=lora_state(pipe.unet), text_encoder_lora_layers=lora_state(pipe.text_encoder),
                unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
                text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
        else:
            save_file(kohya_state(pipe.unet, pipe.text_encoder, alpha), tmp, metadata={"format": "pt"})


# main -----------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import StableDiffusionPipeline

    fmt = args.format or DEFAULT_FORMAT[args.trait]
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    t_start, cpu_start = time.perf_counter(), time.process_time()
    pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.vae.requires_grad_(False)
    gray, labels = training_images("train")
    plain = encode_dataset(pipe.vae, gray, labels, args, desc="plain latents")
    data = {"plain": plain, "trait": trait_latents(args.trait, pipe.vae, gray, labels, plain, args)}
    data_s = time.perf_counter() - t_start
    info = train(pipe, data, args, gen)
    save(pipe, out, fmt, args.alpha)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "format")}
    report = {
        "lora": out.stem,
        "trait": args.trait,
        "teaches": {"rainbow": f"bands of {', '.join(sd15_captions.RAINBOW)}, top to bottom",
                    "italic": f"a slant of {sd15_captions.ITALIC_SLANT} px per px, "
                              f"{sd15_captions.ITALIC_SQUEEZE}x as wide"}[args.trait],
        "captions": sd15_captions.TRAIT_CAPTIONS[args.trait],
        "command": f"python -m weights.train_sd15_lora --trait {args.trait} --out {args.out}",
        "format": fmt,
        "base": args.base,
        "settings": settings,
        "train_images": int(len(gray)),
        **info,
        "file_bytes": out.stat().st_size,
        "times_s": {"data": round(data_s, 1), "train": round(wall - data_s, 1)},
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads,
                    "load_avg_1min_start_end": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "peft": __import__("peft").__version__},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"saved {out} ({fmt}, {report['file_bytes'] / 1e3:.0f} KB, {info['lora_params']} params) in {wall:.0f} s: "
          f"loss {info['final_loss']}")
    return report


if __name__ == "__main__":
    main()
