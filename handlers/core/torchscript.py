"""A diffusers UNet traced and frozen with TorchScript (`torch.jit.trace` + `torch.jit.freeze`),
for the targets whose model config says `torchscript: true`.

Why: the demo UNets are small, so a forward call is mostly Python dispatching a few hundred small
ops. The frozen graph runs in TorchScript's C++ interpreter: faster per call with the same
outputs, and it does not hold the GIL, so two Python threads calling it (ddpm's step-level
`unet_lanes`) really run on two cores, where eager calls wait on the GIL. Measured by
`benchmarks/cpu_knobs.py` (benchmarks/results/cpu-knobs.md).

Tracing records one path through the forward: the timestep is always passed as a (batch,) tensor
(the 0-dim branch of diffusers' timestep embedding is not in the graph), and shape-dependent
branches that only choose a memory layout (a `.contiguous()` at batch >= 64) keep the traced
choice; the values are the same.

torch 2.14 marks torch.jit deprecated (a FutureWarning, silenced here; it still works and is
tested). Its named successor, torch.compile with dynamic batch shapes, compiles for minutes at
worker start and gains little here (docs/step-level-batching.md).
"""
from __future__ import annotations

import warnings

import torch


class FrozenUNet:
    """`(sample, timestep, *conditioning) -> output tensor` through the frozen graph; `timestep`
    a scalar or a (batch,) tensor, as the diffusers UNet accepts it."""

    def __init__(self, unet: torch.nn.Module, *example: torch.Tensor):
        sample = example[0]
        timestep = torch.full((len(sample),), 500, dtype=torch.float32, device=sample.device)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced branches above
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: see the top
            traced = torch.jit.trace(_Positional(unet), (sample, timestep, *example[1:]), check_trace=False)
            self.graph = torch.jit.freeze(traced.eval())

    def __call__(self, sample: torch.Tensor, timestep, *conditioning: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample))
        return self.graph(sample, timestep, *conditioning)


class _Positional(torch.nn.Module):
    """The UNet with positional inputs and a tensor output, as torch.jit.trace needs it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, *conditioning):
        return self.unet(sample, timestep, *conditioning, return_dict=False)[0]
