"""TorchServe handler for the `ddpm` model: unconditional DDPM / DDIM sampling with diffusers.

The archive holds a diffusers DDPM pipeline directory (unet/ + scheduler/); image size and
channels come from the UNet config, the beta schedule from the scheduler config. Requests of one
TorchServe batch that share (scheduler, steps, eta) run as ONE batched denoising loop; every
request has its own torch.Generator for its initial noise and the per-step noise, so a seeded
request gives the same image alone or inside a batch.
"""
from __future__ import annotations

import base64
import inspect
import io
import logging
import time

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from handlers.common import PNG_TYPE, BatchedHandler, Group, Outcome, Pending, timeout_budget
from handlers.ddpm_request import SCHEDULERS, DdpmRequest
from handlers.images import b64_png, encode_png, tensor_to_pil

logger = logging.getLogger(__name__)

TRAJECTORY_FRAMES = 10


class DdpmHandler(BatchedHandler):
    """Batched DDPM / DDIM sampling with per-request seeds and a time budget per batch."""

    request_type = DdpmRequest

    def initialize(self, context):
        wdir = self.prepare(context)
        try:
            self.unet = UNet2DModel.from_pretrained(wdir, subfolder="unet", torch_dtype=self.dtype)
            self.scheduler_config = DDPMScheduler.load_config(wdir, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"ddpm: cannot load the diffusers DDPM directory {wdir}: {exc}") from exc
        self.unet.to(self.device).eval()
        size = self.unet.config.sample_size  # an int, or (height, width) for non-square models
        self.shape = (self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        train_steps = int(self.scheduler_config["num_train_timesteps"])
        self.bind_request({"max_steps": min(int(self.config["max_steps"]), train_steps)})
        self.budget = timeout_budget(context, self.config, "image_steps_per_second")
        self.initialized = True
        logger.info("ddpm: %s images, %s schedule, budget %.0f image-steps per batch on %s",
                    self.shape, self.scheduler_config.get("beta_schedule"), self.budget, self.device)

    def capabilities(self) -> dict:
        return {"schedulers": list(SCHEDULERS), "image_shape": list(self.shape)}

    # inference ----------------------------------------------------------------------------
    def run_group(self, group: Group) -> list[tuple]:
        """One denoising loop for the whole group: per image, (PIL image, x0 frames or None)."""
        shared = group.shared
        scheduler = SCHEDULERS[shared["scheduler"]].from_config(self.scheduler_config)
        # Timesteps stay on the CPU, as in diffusers' DDPMPipeline: step() indexes the scheduler's
        # CPU tables with them; the UNet moves t to its own device.
        scheduler.set_timesteps(shared["steps"])
        generators = group.generators()
        x = randn_tensor((len(generators), *self.shape), generator=generators, device=self.device, dtype=self.dtype)
        x = x * scheduler.init_noise_sigma
        # As diffusers' pipelines do: pass a step() only the arguments it takes (UniPC takes no
        # generator, only DDIM an eta).
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generators} if "generator" in accepted else {}
        if shared["eta"] is not None:
            step_kwargs["eta"] = shared["eta"]
        wanted = group.per_image("trajectory")
        watch = [i for i in group.first_images() if wanted[i]]
        keep = set(torch.linspace(0, len(scheduler.timesteps) - 1, TRAJECTORY_FRAMES).round().int().tolist())
        frames: dict[int, list] = {i: [] for i in watch}
        tick = time.monotonic()
        for k, t in enumerate(scheduler.timesteps):
            with torch.inference_mode():
                eps = self.unet(scheduler.scale_model_input(x, t), t).sample
            if watch and k in keep:
                x0 = predicted_x0(scheduler, x, eps, t)
                for i in watch:
                    frames[i].append(x0[i : i + 1].float())
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            if time.monotonic() - tick > 10:
                logger.info("ddpm: step %d/%d for %d images", k + 1, len(scheduler.timesteps), len(generators))
                tick = time.monotonic()
        pils = tensor_to_pil((x.float() / 2 + 0.5).clamp(0, 1))
        return [(pil, frames.get(i)) for i, pil in enumerate(pils)]

    # postprocess --------------------------------------------------------------------------
    def respond(self, pending: Pending, results: list[tuple]) -> Outcome:
        req = pending.params
        pils = [pil for pil, _ in results]
        if pending.png and not req.trajectory:
            return Outcome(response=encode_png(pils[0]), content_type=PNG_TYPE)
        body = {"images": [b64_png(p) for p in pils], "seed": req.seed, "steps": req.steps,
                "scheduler": req.scheduler}
        if req.scheduler == "ddim":
            body["eta"] = req.eta
        if req.trajectory:
            body["trajectory"] = self.trajectory_gif(results[0][1])
        return Outcome(response=body)

    @staticmethod
    def trajectory_gif(frames: list[torch.Tensor]) -> str:
        """The x0 estimates along the reverse process as an animated GIF (base64)."""
        pils = [tensor_to_pil((f / 2 + 0.5).clamp(0, 1))[0] for f in frames]
        scale = max(1, 128 // pils[0].width)  # tiny demo images: make the animation visible
        pils = [p.resize((p.width * scale, p.height * scale), resample=0) for p in pils]
        buf = io.BytesIO()
        pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=250, loop=0)
        return base64.b64encode(buf.getvalue()).decode("ascii")


def predicted_x0(scheduler, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The clean image the model predicts at timestep t (for the trajectory): from the sample in
    the scheduler's own space (sigma space for Euler, VP space for the others) and the noise."""
    if isinstance(scheduler, EulerDiscreteScheduler):  # x = x0 + sigma * eps
        return x - scheduler.sigmas[scheduler.index_for_timestep(t)] * eps
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
