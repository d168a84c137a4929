"""Build the `sd15` demo weights: a tiny, randomly initialised Stable Diffusion 1.5 pipeline.

It has the real SD1.5 component types (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer with the real CLIP BPE vocabulary, PNDMScheduler configured like SD1.5) in diffusers
layout, so every code path of the `sd15` handler runs offline. Its images are NOISE.

    HF_HUB_OFFLINE=1 .venv/bin/python -m weights.build_sd15_demo [--out weights/demo/sd15-smoke] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from weights.atomic import atomic_dir  # noqa: E402

DEFAULT_OUT = Path("weights/demo/sd15-smoke")
MODEL_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# Tiny sizes. The structure follows SD1.5 (4 UNet levels, 4 VAE blocks -> downscale 8, 4 latent
# channels, 4-channel UNet); widths and depths are shrunk, and see the UNet for one attention change.
TEXT_HIDDEN = 32
UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (16, 16, 32, 32)

DEMO_NOTE = """\
THIS IS A DEMO / SMOKE-TEST MODEL. ITS IMAGES ARE NOISE.

A tiny, randomly initialised (seed {seed}) Stable Diffusion 1.5 pipeline in diffusers layout, built
offline by `python -m weights.build_sd15_demo`. It has the real SD1.5 component types
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer with the real CLIP BPE
vocabulary, PNDMScheduler configured like SD1.5) but none of its weights were trained: whatever the
prompt, the output is meaningless noise. It exists only so the whole serving code path (txt2img,
img2img, inpainting, scheduler switching, batching) can run and be tested without a download.

For real images use PROFILE=pretrained (stable-diffusion-v1-5/stable-diffusion-v1-5).
"""


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that the installed open_clip package ships."""
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Convert CLIP's BPE file into a HF-style vocab (token -> id) and merges list.

    Same construction as CLIP's / open_clip's SimpleTokenizer, with HF's names for the two special
    tokens (open_clip calls them <start_of_text>/<end_of_text>; the ids, 49406/49407, are the same).
    """
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocab has {len(vocab)} entries, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(tok_dir: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json as in SD1.5's `tokenizer/` folder."""
    vocab, merges = clip_vocab_and_merges()
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def open_clip_ids(text: str) -> list[int]:
    """Reference ids: open_clip's SimpleTokenizer (the original CLIP code), with bos/eos around."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(str(clip_bpe_path()))
    return [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]


def build_pipeline(tok_dir: Path, seed: int = 0):
    """The tiny pipeline, in memory. `tok_dir` must hold the files from write_tokenizer_files."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...); from_pretrained works.
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MODEL_MAX_LENGTH)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            projection_dim=TEXT_HIDDEN,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        # sample_size stays 64 like SD1.5, so the pipeline's default size is 512x512 as for the real
        # model; it only sets the default, it does not change the weights.
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=UNET_CHANNELS,
        # SD1.5 also has attention at the full latent resolution; there, self-attention over
        # 64*64 tokens (512px) was ~90% of this tiny UNet's time (25 steps at 512px: 29 s -> ~5 s
        # without it). Cross-attention on the prompt still runs in the two middle levels.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=16,
    ).eval()

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    ).eval()

    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    # SD1.5's scheduler_config.json carries clip_sample=false although PNDM has no such argument;
    # diffusers keeps it as a hidden key, so DDIMScheduler.from_config(...) does not clip (its default).
    scheduler.register_to_config(clip_sample=False)

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def component_summary(pipe, root: Path | None = None) -> dict[str, dict]:
    """Parameter count (and bytes on disk under `root`) per component."""
    out = {}
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        comp = getattr(pipe, name)
        info = {"class": type(comp).__name__}
        if isinstance(comp, torch.nn.Module):
            info["params"] = sum(p.numel() for p in comp.parameters())
        if root is not None and (root / name).is_dir():
            info["bytes"] = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
        out[name] = info
    return out


def load_pipeline(path: Path):
    """Load a saved demo pipeline the way the handler does (offline, from a directory)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)


def verify(path: Path, size: int = 64, steps: int = 2) -> dict[str, float]:
    """Load `path` offline and run txt2img, img2img, inpaint and scheduler swaps. Returns timings (s)."""
    # For this tiny model the OpenMP sync between threads costs more than the compute; on a busy
    # 2-core box one thread is 4-10x faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _verify(path, size, steps)
    finally:
        torch.set_num_threads(threads)


def _check(ok: bool, what) -> None:
    # Not `assert`: the verification must also run under `python -O`.
    if not ok:
        raise RuntimeError(f"sd15 demo verification failed: {what}")


def _verify(path: Path, size: int, steps: int) -> dict[str, float]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )
    from PIL import Image

    timings = {}
    t0 = time.perf_counter()
    pipe = load_pipeline(path)
    timings["load"] = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    _check(pipe.tokenizer.model_max_length == MODEL_MAX_LENGTH, f"model_max_length {pipe.tokenizer.model_max_length}")
    _check(pipe.vae_scale_factor == 8, f"vae_scale_factor {pipe.vae_scale_factor}")
    _check(pipe.text_encoder.config.vocab_size == CLIP_VOCAB_SIZE, "text encoder vocab_size")
    prompt = "a photograph of an astronaut riding a horse"
    _check(pipe.tokenizer(prompt).input_ids == open_clip_ids(prompt), "tokenizer differs from CLIP's")

    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="pil")
    pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)  # warm-up
    t0 = time.perf_counter()
    image = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images[0]
    timings["txt2img"] = time.perf_counter() - t0
    _check(image.size == (size, size), f"txt2img size {image.size}")

    init = Image.new("RGB", (size, size), (128, 64, 32))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    # Built from the same component objects: no second copy of the weights in memory.
    # `components` does not carry requires_safety_checker; without it diffusers logs a warning.
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    _check(img2img.unet is pipe.unet, "img2img does not share the UNet")
    t0 = time.perf_counter()
    out = img2img(prompt, image=init, strength=0.75, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=steps, output_type="pil").images[0]
    timings["img2img"] = time.perf_counter() - t0
    _check(out.size == (size, size), f"img2img size {out.size}")

    inpaint = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    inpaint.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = inpaint(prompt, image=init, mask_image=mask, generator=torch.Generator().manual_seed(0), **kw).images[0]
    timings["inpaint"] = time.perf_counter() - t0
    _check(out.size == (size, size), f"inpaint size {out.size}")

    original = pipe.scheduler
    for cls in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = cls.from_config(original.config)
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)
    pipe.scheduler = original
    return timings


def build(out: Path = DEFAULT_OUT, seed: int = 0, check: bool = True) -> dict:
    """Build, save (atomically) and optionally verify the demo pipeline at `out`. Returns a report."""
    out = Path(out)
    t_start = time.perf_counter()
    with atomic_dir(out) as stage:
        with tempfile.TemporaryDirectory() as tok_tmp:
            write_tokenizer_files(Path(tok_tmp))
            pipe = build_pipeline(Path(tok_tmp), seed=seed)
            pipe.save_pretrained(str(stage), safe_serialization=True)
        # Keep the CLIP files in the saved tokenizer folder too (SD1.5 has them; slow tokenizers
        # of older transformers need them), next to the tokenizer.json transformers 5 writes.
        write_tokenizer_files(stage / "tokenizer")
        (stage / "DEMO_MODEL.txt").write_text(DEMO_NOTE.format(seed=seed), encoding="utf-8")
        build_s = time.perf_counter() - t_start
        timings = verify(stage) if check else {}
    return {
        "out": str(out),
        "build_seconds": build_s,
        "timings": timings,
        "components": component_summary(pipe, out),
        "total_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)")
    parser.add_argument("--no-verify", action="store_true", help="skip the load / txt2img / img2img / inpaint check")
    args = parser.parse_args(argv)

    report = build(args.out, seed=args.seed, check=not args.no_verify)
    print(f"wrote {report['out']} ({report['total_bytes'] / 1e6:.1f} MB) in {report['build_seconds']:.1f} s "
          "-- a randomly initialised demo model: its images are noise")
    for name, info in report["components"].items():
        extra = f" {info['params'] / 1e6:.2f}M params" if "params" in info else ""
        size = f" {info['bytes'] / 1e6:.1f} MB" if "bytes" in info else ""
        print(f"  {name:13s} {info['class']}{extra}{size}")
    if report["timings"]:
        print("  verify (64x64, 2 steps): " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
