"""A UNet in a dtype of its own (`unet_dtype_cpu`), the rest of the model in the worker's dtype;
and whether this CPU has the instructions that make bfloat16 fast.

Why: on a CPU with bf16 matrix instructions (AVX512-BF16, AMX) the diffusion UNets run several
times faster in bfloat16 at their real sizes, within the knob bound of float32 per call, while
SD1.5's VAE decode moves beyond it (benchmarks/results/real-size.md). So only the UNet changes:
its weights are stored in that dtype, each call's floating inputs are cast to it and its output
back to the worker's dtype, so that the samples, the schedulers' arithmetic, the text encoder and
the VAE stay where they were. diffusers has no per-module dtype for a pipeline call (its
pipelines take the UNet's inputs from the text encoder's dtype), hence the two hooks here.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# x86: AVX512-BF16 or AMX; arm: the bf16 feature.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The flags (x86) or features (arm) of Linux's cpuinfo; None where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            return {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return None


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matmul instructions; True where it cannot tell, so that no warning
    is given without evidence."""
    flags = cpu_flags(cpuinfo)
    return flags is None or bool(flags & BF16_FLAGS)


def warn_without_bf16(key: str, dtype: torch.dtype) -> None:
    """Logs a warning naming the config `key` when it puts a CPU model in bfloat16 on a CPU
    without bf16 instructions: it runs, slower than float32."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        logger.warning("%s: bfloat16 on a CPU without bf16 instructions (x86: avx512_bf16 or amx_bf16; arm: "
                       "bf16): it runs, slower than float32; set float32 in the model config (docs/targets.md)", key)


def unet_dtype(config: dict, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """`unet_dtype_cpu` on a CPU when the config sets it, else the worker's dtype (a GPU runs the
    whole model in `dtype_gpu`)."""
    name = config.get("unet_dtype_cpu")
    if device.type != "cpu" or not name:
        return dtype
    chosen = getattr(torch, str(name))
    warn_without_bf16("unet_dtype_cpu", chosen)
    return chosen


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def run_unet_in(unet: torch.nn.Module, dtype: torch.dtype, io_dtype: torch.dtype) -> None:
    """Stores `unet` in `dtype` and makes its calls take and give `io_dtype` tensors (a no-op when
    the two are the same). The output is a tuple (`return_dict=False`) or a diffusers output
    whose `sample` is cast."""
    if dtype == io_dtype:
        return
    unet.to(dtype)

    def inputs(_, args, kwargs):
        return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}

    def output(_, args, kwargs, out):
        if isinstance(out, tuple):
            return _cast(out, io_dtype)
        out.sample = out.sample.to(io_dtype)
        return out

    unet.register_forward_pre_hook(inputs, with_kwargs=True)
    unet.register_forward_hook(output, with_kwargs=True)
