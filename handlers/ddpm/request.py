"""The `ddpm` model's request: every field with its default, limits and documentation, and
which fields split a batch. The handler (handlers/ddpm.py) and docs/api/ddpm.schema.json read it."""
from __future__ import annotations

from typing import Annotated, Literal

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from pydantic import Field, model_validator

from handlers.core.errors import RequestError
from handlers.core.request import BATCHED, ConfigMax, SeededImages

# Each is built from the weights' own scheduler config (its beta schedule, e.g. the demo's cosine).
# dpm++ is DPM-Solver++ (2M) and unipc UniPC (bh2): few-step multistep solvers; euler is Euler's
# method in sigma space. Quality per scheduler and steps: benchmarks/results/ddpm-steps.md.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
# AUTOMATIC1111's names of the same samplers, for the `parameters` text of the PNGs (A1111 has no
# plain DDPM sampler: "DDPM" is written as it is).
A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "dpm++": "DPM++ 2M", "unipc": "UniPC", "euler": "Euler"}


class DdpmRequest(SeededImages):
    """`POST /predictions/ddpm`: unconditional samples of the archive's UNet."""

    # Default: the fewest UNet evaluations within 2 points of DDIM-50's quality with every digit
    # >= 4 % (benchmarks/results/ddpm-steps.md).
    steps: Annotated[int, Field(ge=1), ConfigMax("max_steps"), BATCHED] = 10
    """Denoising steps (at most the scheduler's training steps)."""
    scheduler: Annotated[Literal[tuple(SCHEDULERS)], BATCHED] = "ddpm"
    """Sampler: DDIM (with eta), the ancestral DDPM sampler, or the few-step solvers DPM-Solver++ (2M), UniPC, Euler."""
    eta: Annotated[float | None, Field(ge=0.0, le=1.0), BATCHED] = None
    """DDIM's noise weight (0 = deterministic); null = 0.0 for ddim. ddim only."""
    trajectory: bool = False
    """Adds `trajectory`: an animated GIF of the x0 estimates of the first image."""

    @model_validator(mode="after")
    def _resolve_eta(self):
        if self.scheduler != "ddim" and self.eta is not None:
            raise RequestError("eta", f"'eta' applies to the ddim scheduler only, not {self.scheduler}")
        if self.scheduler == "ddim" and self.eta is None:
            self.eta = 0.0
        return self

    def cost(self) -> float:
        return self.steps * self.num_images

    def cost_field(self) -> str:
        return "steps" if self.steps > self.num_images else "num_images"

    def cost_summary(self) -> str:
        return f"steps x num_images = {self.steps * self.num_images} image-steps"
