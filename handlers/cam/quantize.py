"""int8 cam: the classifier's trunk (every layer up to the CAM's target layer) quantized with
torch.ao's FX graph mode post-training static quantization, calibrated when the model loads on the
calibration images its weights directory carries (`calibration/*.png`). The head (global average
pooling and the linear classifier) stays float: the dequantized features give both the logits and
the CAM, with the same formula as the float fast CAM.

torch.ao.quantization is deprecated in torch 2.14 in favour of torchao, whose CPU int8 path targets
linear layers of transformers; static int8 convolutions with the x86 (fbgemm + onednn) and qnnpack
kernels are what torch.ao still ships, so it is used here.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

CALIBRATION_DIR = "calibration"  # in the weights directory


def calibration_images(wdir: str | Path) -> list[Image.Image]:
    """The calibration set the weights directory carries; ValueError when it has none."""
    folder = Path(wdir) / CALIBRATION_DIR
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not paths:
        raise ValueError(f"cam: quantize: int8 needs calibration images in {folder} (PNG files of the kind of "
                         "picture the model serves); see docs/targets.md, 'int8 cam'")
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


def select_engine(engine: str) -> None:
    """Makes `engine` torch's quantized engine for this process; ValueError when this machine's
    torch lacks it (x86 exists only on x86 builds, qnnpack is the ARM one)."""
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise ValueError(f"cam: quantized_engine {engine!r} is not available here; this torch has {supported}")
    torch.backends.quantized.engine = engine


def quantized_trunk(net: torch.nn.Module, target_layer: str, engine: str, calibration: torch.Tensor,
                    chunk: int = 16) -> torch.fx.GraphModule:
    """`net` up to `target_layer` as an int8 GraphModule whose output {"features": ...} is float
    (dequantized), calibrated on `calibration` (N, 3, H, W) in chunks of `chunk` images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    select_engine(engine)
    trunk = create_feature_extractor(copy.deepcopy(net).eval(), return_nodes={target_layer: "features"})
    with warnings.catch_warnings():  # torch.ao's own deprecation notices (module docstring), once per load
        warnings.filterwarnings("ignore", message=r".*(reduce_range|quantize_per_tensor).*", category=UserWarning)
        prepared = prepare_fx(trunk, get_default_qconfig_mapping(engine), example_inputs=(calibration[:1],))
        with torch.inference_mode():
            for start in range(0, len(calibration), chunk):
                prepared(calibration[start : start + chunk])
        int8 = convert_fx(prepared)
    if not is_quantized(int8):
        raise RuntimeError(f"cam: the {engine} engine left the trunk in float; int8 is not available here")
    return int8


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds quantized convolutions (what a silently float build would lack)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") or
               type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") for m in module.modules())
