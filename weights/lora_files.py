"""Writing LoRA files in the kohya format (what AUTOMATIC1111 and ComfyUI users download): diffusers
reads that format (`load_lora_weights` converts it) but writes only its own, so the renaming is
done here, for the committed demo LoRAs (weights/train_sd15_lora.py) and the tests' fixtures."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# diffusers-format keys: <module path>.lora.down.weight / .lora_linear_layer.up.weight / .lora_A.weight
KEY = re.compile(r"^(?P<module>.+?)\.(?:lora\.|lora_linear_layer\.|lora_)(?P<part>down|up|A|B)\.weight$")


def kohya_state_dict(states: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """{"unet": ..., "text_encoder": ...} diffusers-format LoRA layers -> kohya keys
    (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    out: dict[str, torch.Tensor] = {}
    for component, layers in states.items():
        for key, tensor in layers.items():
            m = KEY.match(key)
            if m is None:
                raise ValueError(f"not a LoRA layer key: {key}")
            name = PREFIX[component] + m["module"].replace(".", "_")
            part = "lora_down" if m["part"] in ("down", "A") else "lora_up"
            out[f"{name}.{part}.weight"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya(path: Path, states: dict[str, dict[str, torch.Tensor]], alpha: float,
               metadata: dict[str, str] | None = None) -> None:
    """`alpha` = the rank for a LoRA trained at scale alpha / rank = 1."""
    save_file(kohya_state_dict(states, alpha), str(path), metadata=metadata)
