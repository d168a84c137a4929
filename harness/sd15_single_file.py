"""Single-file (original CompVis/LDM key layout) Stable Diffusion 1.5 checkpoints for tests: a
narrow model in SD1.5's exact layout, written both as a diffusers directory and as one
`.safetensors` file the way AUTOMATIC1111 and ComfyUI keep them, plus the foreign files
weights/single_file.py must refuse.

Why a model of its own: the original layout numbers its blocks from SD1.5's structure
(`input_blocks.1` .. `input_blocks.11`, `output_blocks.0` .. `output_blocks.11`, the VAE's
`down.0` .. `down.3`), and diffusers' reader derives the diffusers names back from those numbers
with SD1.5's block counts. The demo model (3 UNet levels, one layer per block) has no place in
that numbering. This one is built from diffusers' and transformers' own classes with SD1.5's
structure: UNet CrossAttnDownBlock2D x3 + DownBlock2D with 2 layers per block, SD1.5's up blocks,
1x1-conv attention projections; a VAE with 4 levels of 2 layers; a CLIPTextModel; SD1.5's scheduler
config and CLIP tokenizer (weights/sd15-config). Only the widths and the text encoder's depth are
small (~17 MB in fp32). It is randomly initialised from a seed: its images are noise, enough to
compare two loadings of it pixel by pixel. Its config tree is the diffusers directory's JSON files
without the weights. The single file is written as A1111's files are: fp32 or fp16, with the
entries real files carry beyond the weights (position ids, the training schedule's buffers, EMA
bookkeeping).

The directory -> original direction is not in the diffusers package (it ships only the reading
direction, diffusers/loaders/single_file_utils.py); `to_original` vendors the mapping of
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py (Apache-2.0, The HuggingFace
Team), updated to today's diffusers attention names (to_q / to_out.0 instead of query / proj_attn).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weights.single_file import DEFAULT_CONFIG, TEXT, UNET, VAE

UNET_CHANNELS = (16, 32, 64, 64)  # SD1.5: 320, 640, 1280, 1280
VAE_CHANNELS = (8, 16, 32, 32)  # SD1.5: 128, 256, 512, 512
TEXT_HIDDEN = 32  # SD1.5: 768, also the UNet's cross-attention width
SD2_CONTEXT = 1024  # OpenCLIP ViT-H/14's width: SD2's cross-attention context
SDXL_CONTEXT = 2048  # CLIP-L 768 + OpenCLIP bigG 1280
SDXL_ADM_IN = 2816  # SDXL's label_emb input: pooled text 1280 + 6 size/crop embeddings x 256


def build_pipeline(seed: int = 0):
    """The narrow SD1.5-layout pipeline, randomly initialised (in memory). Its scheduler and
    tokenizer are SD1.5's, from the project's config tree."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(DEFAULT_CONFIG / "tokenizer"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=8, sample_size=512,
    ).eval()
    scheduler = PNDMScheduler.from_pretrained(str(DEFAULT_CONFIG), subfolder="scheduler")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_pipeline_dir(out: Path, seed: int = 0) -> Path:
    build_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def write_config_tree(pipeline_dir: Path, out: Path) -> Path:
    """The directory's configs and tokenizer without its weights: what --config takes."""
    for src in Path(pipeline_dir).rglob("*"):
        if src.is_file() and src.suffix in (".json", ".txt"):
            dst = Path(out) / src.relative_to(pipeline_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return Path(out)


@dataclass(frozen=True)
class Fixture:
    directory: Path  # the diffusers directory
    config_tree: Path  # its configs and tokenizer, no weights
    fp32: Path  # the same weights as one original-layout file
    fp16: Path  # the same, rounded to fp16


def write_fixture(root: Path, seed: int = 0) -> Fixture:
    """The fixture model in every form under `root`."""
    root = Path(root)
    directory = write_pipeline_dir(root / "diffusers", seed)
    return Fixture(directory, write_config_tree(directory, root / "config-tree"),
                   write_single_file(directory, root / "sd15-fixture.safetensors"),
                   write_single_file(directory, root / "sd15-fixture-fp16.safetensors", torch.float16))


# -- diffusers -> original names (vendored, see the module docstring) ----------------------
def _unet_prefixes() -> list[tuple[str, str]]:
    """(original, diffusers) prefixes of SD1.5's UNet: 4 levels, 2 layers down and 3 up."""
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


UNET_PREFIXES = _unet_prefixes()
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _unet_key(key: str) -> str:
    for hf, sd in UNET_TOP.items():
        if key.startswith(hf):
            return sd + key[len(hf):]
    if "resnets" in key:
        for sd, hf in UNET_RESNET:
            key = key.replace(hf, sd)
    for sd, hf in UNET_PREFIXES:
        key = key.replace(hf, sd)
    return key


def _vae_prefixes() -> list[tuple[str, str]]:
    """(original, diffusers) name parts of SD1.5's VAE: 4 levels, 2 layers down and 3 up, up levels
    numbered the other way round."""
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        pairs += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    return pairs


VAE_PREFIXES = _vae_prefixes()
VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def _vae_entry(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    for sd, hf in VAE_PREFIXES:
        key = key.replace(hf, sd)
    if ".attn_1." in key:
        for sd, hf in VAE_ATTENTION:
            key = key.replace(hf, sd)
        if key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # the original's attention projections are 1x1 convs
    return key, tensor


def to_original(unet: dict, vae: dict, text_encoder: dict) -> dict[str, torch.Tensor]:
    """One state dict in the original layout from the three components' diffusers state dicts."""
    out = {UNET + _unet_key(k): v for k, v in unet.items()}
    for k, v in vae.items():
        key, tensor = _vae_entry(k, v)
        out[VAE + key] = tensor
    out.update({TEXT + "text_model." + k: v for k, v in text_encoder.items()})
    return out


def ldm_extras() -> dict[str, torch.Tensor]:
    """Entries of real SD1.5 files that are no component's weights: the text encoder's position
    ids, the training schedule's buffers, the EMA bookkeeping."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {TEXT + "text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
            "betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float(),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32)}


def write_single_file(pipeline_dir: Path, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The diffusers directory as one original-layout .safetensors file, floats in `dtype`."""
    d = Path(pipeline_dir)
    state = to_original(load_file(d / "unet/diffusion_pytorch_model.safetensors"),
                        load_file(d / "vae/diffusion_pytorch_model.safetensors"),
                        load_file(d / "text_encoder/model.safetensors"))
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    state.update(ldm_extras())
    save_file(state, str(path))
    return Path(path)


# -- files that are not an SD1.5 checkpoint ------------------------------------------------
def _widen_context(state: dict, width: int) -> dict:
    """The UNet's cross-attention key / value projections reading a context `width` wide."""
    return {k: (torch.zeros(v.shape[0], width, dtype=v.dtype) if k.startswith(UNET) and
                k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v) for k, v in state.items()}


def _open_clip(prefix: str, width: int, layers: int = 1) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's keys at its real width (a small vocabulary: names and widths
    are what identify it)."""
    out = {f"{prefix}token_embedding.weight": torch.zeros(8, width), f"{prefix}positional_embedding": torch.zeros(77, width),
           f"{prefix}ln_final.weight": torch.ones(width), f"{prefix}ln_final.bias": torch.zeros(width),
           f"{prefix}text_projection": torch.zeros(width, width)}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        out.update({block + "attn.in_proj_weight": torch.zeros(3 * width, width),
                    block + "attn.out_proj.weight": torch.zeros(width, width),
                    block + "ln_1.weight": torch.ones(width), block + "mlp.c_fc.weight": torch.zeros(4, width)})
    return out


FOREIGN_KINDS = {
    "sd2": "SD2: OpenCLIP text encoder (cond_stage_model.model.*), 1024-wide context",
    "sdxl": "SDXL: conditioner.embedders.*, label_emb, 2048-wide context",
    "lora-kohya": "a LoRA in kohya's names (lora_unet_*, *.lora_down.weight)",
    "lora-peft": "a LoRA in diffusers / peft names (*.lora_A.weight, *.lora_B.weight)",
    "no-unet": "the fixture without its UNet",
    "no-vae": "the fixture without its VAE",
    "no-text-encoder": "the fixture without its text encoder",
    "inpainting": "an inpainting UNet (9 input channels)",
    "context-1024": "the fixture with SD2's 1024-wide context (and SD1.5's text encoder keys)",
    "missing-layer": "the fixture without the second layer of its UNet's first level",
}


def foreign_state(kind: str, good: Path) -> dict[str, torch.Tensor]:
    """The state dict of a file that is no SD1.5 checkpoint (FOREIGN_KINDS), derived from the
    good fixture file `good`."""
    state = load_file(str(good))
    text = {k: v for k, v in state.items() if k.startswith(TEXT)}
    rest = {k: v for k, v in state.items() if not k.startswith(TEXT)}
    if kind == "sd2":
        return {**_widen_context(rest, SD2_CONTEXT), **_open_clip("cond_stage_model.model.", SD2_CONTEXT)}
    if kind == "sdxl":
        embedders = {k.replace(TEXT, "conditioner.embedders.0.transformer."): v for k, v in text.items()}
        return {**_widen_context(rest, SDXL_CONTEXT), **embedders, **_open_clip("conditioner.embedders.1.model.", 1280),
                UNET + "label_emb.0.0.weight": torch.zeros(4 * UNET_CHANNELS[0], SDXL_ADM_IN)}
    if kind == "lora-kohya":
        block = "lora_unet_down_blocks_0_attentions_0_proj_in"
        return {f"{block}.lora_down.weight": torch.zeros(4, 16, 1, 1), f"{block}.lora_up.weight": torch.zeros(16, 4, 1, 1),
                f"{block}.alpha": torch.tensor(4.0),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, TEXT_HIDDEN)}
    if kind == "lora-peft":
        base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q."
        return {base + "lora_A.weight": torch.zeros(4, 16), base + "lora_B.weight": torch.zeros(16, 4)}
    if kind == "inpainting":
        conv_in = UNET + "input_blocks.0.0.weight"
        return {**state, conv_in: torch.zeros(state[conv_in].shape[0], 9, 3, 3, dtype=state[conv_in].dtype)}
    if kind == "context-1024":
        return _widen_context(state, SD2_CONTEXT)
    dropped = {"no-unet": UNET, "no-vae": VAE, "no-text-encoder": TEXT, "missing-layer": UNET + "input_blocks.2."}[kind]
    return {k: v for k, v in state.items() if not k.startswith(dropped)}


def write_foreign(kind: str, good: Path, path: Path) -> Path:
    """A foreign file at `path`: one of FOREIGN_KINDS, or `truncated` (the good file cut in half),
    `pickle` (a torch.save pickle under any name)."""
    path = Path(path)
    if kind == "truncated":
        data = Path(good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, path)
    else:
        save_file(foreign_state(kind, good), str(path))
    return path
