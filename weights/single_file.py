"""Single-file Stable Diffusion 1.5 checkpoints -> the diffusers directory the sd15 handler loads.

A single file is one `.safetensors` in the original (CompVis/LDM) key layout, what AUTOMATIC1111
and ComfyUI keep in `models/`. It is read by diffusers' single-file loader with a local config
tree (default weights/sd15-config/: SD1.5's configs and CLIP tokenizer), offline, and written in
the file's own precision; the handler casts to its target's dtype when it loads. Before anything
is loaded, the file is checked from its header alone (names, dtypes, shapes): pickles (`.ckpt`,
`.pt`, `.pth`, `.bin`) run code when loaded and are refused, as are truncated files, SD2, SDXL,
LoRAs, files missing a component and files whose shapes do not fit the config tree. Each refusal
is one line on stderr and exit status 1. docs/your-own-sd.md.

    python -m weights.single_file FILE --out DIR [--config TREE]
    python -m weights.single_file FILE --check [--config TREE]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections import Counter
from pathlib import Path

from handlers.sd15.loras import PICKLE_SUFFIXES

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "sd15-config"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
COMPONENTS = {UNET: "UNet", VAE: "VAE", TEXT: "CLIP text encoder"}
CONTEXT_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET + "input_blocks.0.0.weight"
CONTEXT_OF = {768: "SD1.5's CLIP ViT-L/14", 1024: "SD2's OpenCLIP ViT-H/14", 2048: "SDXL's CLIP-L + OpenCLIP bigG"}
LORA_MARKS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_A.weight",
              "lora_B.weight")


class Refused(ValueError):
    """A file that is not a single-file SD1.5 checkpoint for the config tree; str() says why."""


def config_tree() -> Path:
    """The config tree single files are read with: SD15_CONFIG_TREE, else weights/sd15-config."""
    return Path(os.environ.get("SD15_CONFIG_TREE") or DEFAULT_CONFIG).resolve()


def unet_config(tree: Path) -> dict:
    return json.loads((tree / "unet" / "config.json").read_text())


def expected(tree: Path) -> str:
    width = unet_config(tree)["cross_attention_dim"]
    return (f"expected an SD1.5 checkpoint: UNet, VAE and CLIP text encoder ({', '.join(p + '*' for p in COMPONENTS)}) "
            f"with a {width}-wide cross-attention context")


def read_header(path: Path) -> dict[str, dict]:
    """The tensors a .safetensors file declares, {name: {"dtype", "shape", "data_offsets"}},
    read from its header without loading anything; Refused when it is no complete safetensors file."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise Refused(f"is a pickle ({path.suffix}): loading a pickle runs code from the file; only .safetensors "
                      "checkpoints are accepted")
    if path.suffix.lower() != ".safetensors":
        raise Refused(f"has the suffix '{path.suffix}': only .safetensors checkpoints are accepted")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < length <= min(MAX_HEADER, size - 8):
                raise ValueError
            header = json.loads(f.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            if head.startswith((b"PK\x03\x04", b"\x80")):
                raise Refused("is not a safetensors file: it is a pickle (torch.save) under a .safetensors name, and "
                              "loading a pickle runs code from the file") from None
            raise Refused("is not a safetensors file (its header does not parse)") from None
    if 8 + length + end > size:
        raise Refused(f"is truncated: its header declares {8 + length + end} bytes, the file has {size} "
                      "(an interrupted download or copy?)")
    return tensors


def identify(tensors: dict[str, dict], tree: Path) -> None:
    """Refused, saying what the file is, unless its names and key widths are SD1.5's for `tree`."""
    names = list(tensors)
    lora = [n for n in names if any(mark in n for mark in LORA_MARKS)]
    if lora:
        raise Refused(f"is a LoRA ({len(lora)} LoRA keys such as '{lora[0]}'), not a checkpoint: a LoRA is applied "
                      f"on top of a model; {expected(tree)}")
    if any(n.startswith(("conditioner.embedders.", UNET + "label_emb.")) for n in names):
        raise Refused(f"is an SDXL checkpoint (conditioner.embedders.*, label_emb){context_of(tensors)}; {expected(tree)}")
    if any(n.startswith("cond_stage_model.model.") for n in names):
        raise Refused(f"is an SD2 checkpoint (OpenCLIP text encoder cond_stage_model.model.*){context_of(tensors)}; "
                      f"{expected(tree)}")
    missing = [f"{what} ({prefix}*)" for prefix, what in COMPONENTS.items() if not any(n.startswith(prefix) for n in names)]
    if missing:
        raise Refused(f"has no {' and no '.join(missing)}; {expected(tree)}")
    config = unet_config(tree)
    channels = tensors.get(CONV_IN_KEY, {}).get("shape", [None, None])[1]
    if channels is not None and channels != config["in_channels"]:
        kind = "an inpainting checkpoint: " if channels == 9 else ""
        raise Refused(f"is {kind}its UNet takes {channels} input channels, the config tree's {config['in_channels']}; "
                      f"{expected(tree)}")
    width, want = context_width(tensors), config["cross_attention_dim"]
    if width is not None and width != want:
        raise Refused(f"has a {width}-wide cross-attention context{named(width)}; the config tree {tree} expects "
                      f"{want}{named(want)} (a model of other widths needs a config tree of its own)")


def named(width: int) -> str:
    return f" ({CONTEXT_OF[width]})" if width in CONTEXT_OF else ""


def context_width(tensors: dict[str, dict]) -> int | None:
    return tensors.get(CONTEXT_KEY, {}).get("shape", [None])[-1]


def context_of(tensors: dict[str, dict]) -> str:
    width = context_width(tensors)
    return f", cross-attention context {width} wide" if width else ""


def check_layout(tensors: dict[str, dict], tree: Path) -> None:
    """Refused unless diffusers' own conversion of the file's names and shapes gives every weight of
    the UNet, VAE and text encoder the config tree describes, each in its shape (on the meta
    device: nothing is read or allocated)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    meta = {k: torch.empty(v["shape"], dtype=dtypes.get(v["dtype"], torch.float32), device="meta")
            for k, v in tensors.items()}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tree, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tree, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(tree, subfolder="text_encoder"))
    conversions = (("UNet", unet, lambda: convert_ldm_unet_checkpoint(meta, unet.config)),
                   ("VAE", vae, lambda: convert_ldm_vae_checkpoint(meta, vae.config)),
                   # transformers 5's CLIPTextModel has no text_model wrapper (diffusers strips it too)
                   ("CLIP text encoder", text, lambda: {k.removeprefix("text_model."): v
                                                        for k, v in convert_ldm_clip_checkpoint(meta).items()}))
    for what, model, conversion in conversions:
        try:
            converted = conversion()
        except Exception as exc:  # the reader's own failure on an odd key set, said in one line
            raise Refused(f"does not convert to the {what} of the config tree {tree} ({type(exc).__name__}: {exc}); "
                          f"{expected(tree)}") from None
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items() if v is not None}
        missing = [k for k in want if k not in got]
        if missing:
            raise Refused(f"lacks {len(missing)} of the {len(want)} {what} weights of the config tree {tree} "
                          f"(first: {missing[0]}); {expected(tree)}")
        wrong = [k for k in want if got[k] != want[k]]
        if wrong:
            raise Refused(f"has {len(wrong)} {what} weights shaped otherwise than the config tree {tree} says (first: "
                          f"{wrong[0]} is {list(got[wrong[0]])}, expected {list(want[wrong[0]])}); {expected(tree)}")


def file_dtype(tensors: dict[str, dict]) -> str:
    """The precision of the file's UNet weights (most of them, when mixed): float16, bfloat16 or float32."""
    counts = Counter(v["dtype"] for k, v in tensors.items() if k.startswith(UNET))
    dtype = counts.most_common(1)[0][0]
    if dtype not in FLOAT_DTYPES:
        raise Refused(f"stores its UNet as {dtype}: float16, bfloat16 or float32 expected")
    return FLOAT_DTYPES[dtype]


def inspect(path: Path, tree: Path) -> str:
    """Every check of a file against a config tree; returns its precision. Refused otherwise."""
    tensors = read_header(path)
    identify(tensors, tree)
    check_layout(tensors, tree)
    return file_dtype(tensors)


def convert(path: Path, out: Path, tree: Path) -> str:
    """Write the diffusers directory of single file `path` at `out` (atomically), in the file's
    precision; returns the precision. Nothing is fetched: the config tree is local."""
    dtype = inspect(path, tree)  # before importing diffusers: most refusals take no time
    import diffusers
    import torch
    import transformers

    from handlers.sd15 import library_logs
    from weights.atomic import atomic_dir

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    library_logs.quiet()
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(tree), local_files_only=True, dtype=getattr(torch, dtype),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(out) as stage:
        pipe.save_pretrained(str(stage), safe_serialization=True)
    return dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the .safetensors checkpoint")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="the diffusers directory to write")
    action.add_argument("--check", action="store_true", help="only check the file")
    parser.add_argument("--config", type=Path, help="diffusers config tree of the model (default: SD15_CONFIG_TREE, "
                        f"else {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    args = parser.parse_args(argv)
    tree = args.config.resolve() if args.config else config_tree()
    if not (tree / "model_index.json").is_file():
        print(f"single_file: config tree {tree} has no model_index.json", file=sys.stderr)
        return 1
    if not args.file.is_file():
        print(f"single_file: {args.file}: no such file", file=sys.stderr)
        return 1
    try:
        if args.check:
            dtype = inspect(args.file, tree)
        else:
            dtype = convert(args.file, args.out, tree)
    except Refused as exc:
        print(f"single_file: {args.file} {exc}", file=sys.stderr)
        return 1
    print(f"single_file: {args.file}: SD1.5 checkpoint, {dtype}" + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
