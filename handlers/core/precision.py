"""A UNet in a dtype of its own (`unet_dtype_cpu`), the rest of the model in the worker's dtype.

Why: on a CPU with bf16 matrix instructions (AVX512-BF16, AMX) the diffusion UNets run several
times faster in bfloat16 at their real sizes, within the knob bound of float32 per call, while
SD1.5's VAE decode moves beyond it (benchmarks/results/real-size.md). So only the UNet changes:
its weights are stored in that dtype, each call's floating inputs are cast to it and its output
back to the worker's dtype, so that the samples, the schedulers' arithmetic, the text encoder and
the VAE stay where they were. diffusers has no per-module dtype for a pipeline call (its
pipelines take the UNet's inputs from the text encoder's dtype), hence the two hooks here.
"""
from __future__ import annotations

import torch


def unet_dtype(config: dict, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """`unet_dtype_cpu` on a CPU when the config sets it, else the worker's dtype (a GPU runs the
    whole model in `dtype_gpu`)."""
    name = config.get("unet_dtype_cpu")
    return getattr(torch, str(name)) if device.type == "cpu" and name else dtype


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
