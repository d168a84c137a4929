"""LoRA files for tests: a random LoRA of a pipeline's UNet attention layers (and optionally its
text encoder), written in diffusers' format or in the kohya format A1111 and ComfyUI users download."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from weights.lora_files import save_kohya

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(weights: Path, out: Path, seed: int, fmt: str = "diffusers", rank: int = 4, std: float = 0.3,
                text_encoder: bool = False, cross_attention_dim: int | None = None) -> Path:
    """A LoRA for the pipeline at `weights` with random up and down weights (peft initialises the
    up weights to zero: such a LoRA would change nothing) written to `out` (.safetensors).
    `cross_attention_dim` builds it for a UNet of another context width: a LoRA that does not fit."""
    pipe = StableDiffusionPipeline.from_pretrained(weights, safety_checker=None, local_files_only=True)
    unet = pipe.unet
    if cross_attention_dim is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": cross_attention_dim})
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    layers = {"unet": unet}
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers["text_encoder"] = pipe.text_encoder
    for module in layers.values():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=std)
    states = {k: convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) for k, m in layers.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        save_kohya(out, states, rank)
    else:
        StableDiffusionPipeline.save_lora_weights(out.parent, unet_lora_layers=states["unet"],
                                                  text_encoder_lora_layers=states.get("text_encoder"),
                                                  weight_name=out.name)
    return out
