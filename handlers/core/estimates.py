"""The clean image a diffusion model predicts at a timestep (its x0 estimate): what ddpm's
trajectory and previews show, and what a request answers when its `deadline_s` stops it early
(ddpm and sd15)."""
from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler


def predicted_x0(scheduler, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The clean image the model predicts at timestep t: from the sample x it was given in
    the scheduler's own space (sigma space for Euler, VP space for the others) and the noise."""
    if isinstance(scheduler, EulerDiscreteScheduler):  # x = x0 + sigma * eps
        return x - scheduler.sigmas[scheduler.index_for_timestep(t)] * eps
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
