"""TorchServe handler for the `ddpm` model: unconditional DDPM / DDIM sampling with diffusers.

The archive holds a diffusers DDPM pipeline directory (unet/ + scheduler/); image size and
channels come from the UNet config, the beta schedule from the scheduler config. Requests of one
TorchServe batch that share (scheduler, steps, eta) run as ONE batched denoising loop; every
request has its own torch.Generator for its initial noise and the per-step noise, so a seeded
request gives the same image alone or inside a batch.
"""
from __future__ import annotations

import base64
import io
import logging
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from handlers.common import (
    PNG_TYPE,
    SEED_PARAM,
    BatchedHandler,
    Outcome,
    Param,
    RequestError,
    b64_png,
    encode_png,
    json_body,
    parse_params,
    resolve_seed,
    tensor_to_pil,
    timeout_budget,
    wants_png,
)

logger = logging.getLogger(__name__)

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
TRAJECTORY_FRAMES = 10


class DdpmHandler(BatchedHandler):
    """Batched DDPM / DDIM sampling with per-request seeds and a time budget per batch."""

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
        self.max_steps = min(int(self.config.get("max_steps", train_steps)), train_steps)
        self.max_images = int(self.config.get("max_num_images", 16))
        self.budget = timeout_budget(context, self.config, "image_steps_per_second")
        self.spec = {
            "num_images": Param(int, 1, minimum=1, maximum=self.max_images),
            "steps": Param(int, 50, minimum=1, maximum=self.max_steps),
            "scheduler": Param(str, "ddim", choices=tuple(SCHEDULERS)),
            "eta": Param(float, None, minimum=0.0, maximum=1.0, nullable=True),
            "seed": SEED_PARAM,
            "trajectory": Param(bool, False),
        }
        self.initialized = True
        logger.info("ddpm: %s images, %s schedule, budget %.0f image-steps per batch on %s",
                    self.shape, self.scheduler_config.get("beta_schedule"), self.budget, self.device)

    # preprocess ---------------------------------------------------------------------------
    def parse(self, row, idx: int) -> dict:
        params = parse_params(json_body(row), self.spec)
        if params["scheduler"] == "ddpm" and params["eta"] is not None:
            raise RequestError("eta", "'eta' applies to the ddim scheduler only (ddpm always adds noise)")
        if params["scheduler"] == "ddim" and params["eta"] is None:
            params["eta"] = 0.0
        field = "steps" if params["steps"] > params["num_images"] else "num_images"
        self.check_cost(params, field, f"steps x num_images = {params['steps'] * params['num_images']} image-steps")
        params["seed"] = resolve_seed(params["seed"])
        params["png"] = wants_png(self.context, idx) and params["num_images"] == 1
        return params

    def group_key(self, req: dict):
        return req["scheduler"], req["steps"], req["eta"]

    def cost(self, req: dict) -> float:
        return req["steps"] * req["num_images"]

    # inference ----------------------------------------------------------------------------
    def sample(self, reqs: list[dict]) -> tuple[torch.Tensor, list[list]]:
        """One denoising loop for the whole group. Returns images in [0, 1] (N, C, H, W) and,
        for requests that asked for it, the x0 estimates of their first image along the way."""
        first = reqs[0]
        scheduler = SCHEDULERS[first["scheduler"]].from_config(self.scheduler_config)
        # Timesteps stay on the CPU, as in diffusers' DDPMPipeline: step() indexes the scheduler's
        # CPU tables with them; the UNet moves t to its own device.
        scheduler.set_timesteps(first["steps"])
        generators = []
        for req in reqs:
            gen = torch.Generator(device="cpu").manual_seed(req["seed"])
            generators += [gen] * req["num_images"]  # a request's images draw from its own stream
        n = len(generators)
        x = randn_tensor((n, *self.shape), generator=generators, device=self.device, dtype=self.dtype)
        x = x * scheduler.init_noise_sigma
        step_kwargs = {"eta": first["eta"]} if first["scheduler"] == "ddim" else {}
        starts = [0]
        for req in reqs:
            starts.append(starts[-1] + req["num_images"])
        watch = [starts[i] for i, r in enumerate(reqs) if r["trajectory"]]
        keep = set(torch.linspace(0, len(scheduler.timesteps) - 1, TRAJECTORY_FRAMES).round().int().tolist())
        frames: dict[int, list] = {i: [] for i in watch}
        tick = time.monotonic()
        for k, t in enumerate(scheduler.timesteps):
            with torch.inference_mode():
                eps = self.unet(x, t).sample
            out = scheduler.step(eps, t, x, generator=generators, **step_kwargs)
            x = out.prev_sample
            if watch and k in keep:
                for i in watch:
                    frames[i].append(out.pred_original_sample[i : i + 1].float())
            if time.monotonic() - tick > 10:
                logger.info("ddpm: step %d/%d for %d images", k + 1, len(scheduler.timesteps), n)
                tick = time.monotonic()
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        return images, [frames.get(starts[i], []) for i in range(len(reqs))]

    def run_group(self, reqs: list[dict]) -> list[Outcome]:
        images, trajectories = self.sample(reqs)
        outcomes, start = [], 0
        for req, frames in zip(reqs, trajectories):
            pils = tensor_to_pil(images[start : start + req["num_images"]])
            start += req["num_images"]
            if req["png"] and not req["trajectory"]:
                outcomes.append(Outcome(response=encode_png(pils[0]), content_type=PNG_TYPE))
                continue
            body = {"images": [b64_png(p) for p in pils], "seed": req["seed"], "steps": req["steps"],
                    "scheduler": req["scheduler"]}
            if req["scheduler"] == "ddim":
                body["eta"] = req["eta"]
            if req["trajectory"]:
                body["trajectory"] = self.trajectory_gif(frames)
            outcomes.append(Outcome(response=body))
        return outcomes

    @staticmethod
    def trajectory_gif(frames: list[torch.Tensor]) -> str:
        """The x0 estimates along the reverse process as an animated GIF (base64)."""
        pils = [tensor_to_pil((f / 2 + 0.5).clamp(0, 1))[0] for f in frames]
        scale = max(1, 128 // pils[0].width)  # tiny demo images: make the animation visible
        pils = [p.resize((p.width * scale, p.height * scale), resample=0) for p in pils]
        buf = io.BytesIO()
        pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=250, loop=0)
        return base64.b64encode(buf.getvalue()).decode("ascii")
