"""The `sd15` model: Stable Diffusion 1.5 txt2img, img2img and inpainting
with diffusers, all three from ONE set of components (the img2img and inpaint pipelines are built
with `from_pipe`, which shares the UNet, VAE, text encoder and tokenizer).

Requests of one TorchServe batch with the same mode, size, steps, scheduler, guidance and
strength run as one pipeline call with a list of prompts and one generator per image (a
request's images all draw from that request's own generator), so a seeded request gives the same
image alone or inside a batch. Each group gets a fresh scheduler instance. The request, its
defaults and its cost model are declared in handlers/sd15/request.py.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from handlers.core import provenance
from handlers.core.batch import PNG_TYPE, Group, Outcome, Pending, group_of
from handlers.core.estimates import predicted_x0
from handlers.core.images import b64_png, encode_png, tensor_to_pil
from handlers.core.model import ServedModel
from handlers.core.precision import run_unet_in, unet_dtype
from handlers.sd15 import library_logs
from handlers.sd15.loras import LoraLibrary
from handlers.sd15.request import (
    A1111_SAMPLERS,
    DECODE_COST,
    REFERENCE_PIXELS,
    SCHEDULERS,
    STEP_COST,
    Sd15Request,
    work,
)

logger = logging.getLogger(__name__)
library_logs.quiet()

DEMO_WARNING = "demo profile: a randomly initialised smoke-test model; its images are noise"



class DeadlinePassed(Exception):
    """The group's deadline_s passed: its pipeline call stops after the current step."""


def stash_steps(scheduler) -> dict:
    """Keeps the latest (sample, guided noise prediction, timestep) the pipeline hands `scheduler.step`
    (a fresh scheduler per group), from which a deadline's x0 estimate is computed: diffusers'
    pipelines do not expose the noise prediction to step callbacks."""
    last: dict = {}
    step = scheduler.step

    def stashing_step(model_output, timestep, sample, *args, **kwargs):
        last.update(eps=model_output, t=timestep, sample=sample)
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = stashing_step
    return last

class Sd15Model(ServedModel):
    """txt2img / img2img / inpainting with batching, seeds, limits and a time budget."""

    request_type = Sd15Request

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wdir = self.weights
        # A disabled safety checker is not even loaded (it is a 1.2 GB CLIP model in real SD1.5).
        no_checker = {} if self.config.get("safety_checker", True) else {"safety_checker": None}
        try:
            base = StableDiffusionPipeline.from_pretrained(wdir, dtype=self.dtype, local_files_only=True,
                                                           **no_checker)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"sd15: cannot load the diffusers Stable Diffusion directory {wdir}: {exc}") from exc
        base.to(self.device)
        # The checker is run by this handler (report, don't black out), never inside the pipeline.
        self.safety_checker = base.safety_checker
        base.safety_checker = None
        base.register_to_config(requires_safety_checker=False)
        run_unet_in(base.unet, unet_dtype(self.config, self.device, self.dtype), self.dtype)
        if self.config.get("attention_slicing"):
            base.enable_attention_slicing()
        set_vae_tiles(base.vae, self.config.get("vae_tile_size"))
        if self.config.get("compile"):
            base.unet = torch.compile(base.unet)
        # from_pipe casts the modules it shares to its own dtype argument (float32 when left out),
        # the UNet included: the pipelines are made without one, sharing the modules as they are.
        self.pipes = {
            "txt2img": base,
            "img2img": StableDiffusionImg2ImgPipeline(**base.components, requires_safety_checker=False),
            "inpaint": StableDiffusionInpaintPipeline(**base.components, requires_safety_checker=False),
        }
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = base.scheduler.config
        # A relative lora_dir is inside the weights directory (the archive's own `loras/` by default).
        self.loras = LoraLibrary(os.path.join(wdir, self.config["lora_dir"]), float(self.config["lora_cache_mb"]),
                                 base.unet.dtype.itemsize)
        self.tokenizer = base.tokenizer
        self.demo = os.path.isfile(os.path.join(wdir, "DEMO_MODEL.txt"))
        # As diffusers' pipelines do: the UNet's sample size in pixels (512 for SD1.5).
        self.native_size = int(base.unet.config.sample_size * base.vae_scale_factor)
        missing = [k for k in ("max_loras", "lora_scales") if k not in self.config]
        if missing:  # read by a request's validation only: fail the load, not the first request naming a LoRA
            raise KeyError(f"model config lacks handler.{missing[0]}")
        self.bind_request()
        self.start_clock(self.measure_step())
        self.latent_rgb = latent_rgb_fit(base.vae, self.device, self.dtype)
        logger.info("sd15: loaded %s on %s (%s)%s", wdir, self.device, self.dtype, " [demo]" if self.demo else "")

    def measure_step(self) -> float:
        """Seconds per cost unit, measured at load on one 2-step 256x256 txt2img request (text
        encoding, guided UNet calls, VAE decode): the slowest of its parts per unit of the cost
        model, the last UNet step over STEP_COST, the decode over DECODE_COST, the whole request
        over its cost. The cost model holds SD1.5's proportions of step to decode, which another
        model (the demo one) need not share: with the slowest part, a request of any number of
        steps errs slow, and so does the first call's overhead (make bench:
        limits.sd15.rate_over_estimate)."""
        request = self.request.parse({"prompt": "", "steps": 2, "width": 256, "height": 256, "seed": 0},
                                     self.validation_context())
        step_ends = []
        started = time.perf_counter()
        self.run_group(group_of(Pending(0, request)), lambda *_: step_ends.append(time.perf_counter()))
        finished = time.perf_counter()
        p = request.width * request.height / REFERENCE_PIXELS
        return max((finished - started) / request.cost(), (step_ends[-1] - step_ends[-2]) / work(STEP_COST, p),
                   (finished - step_ends[-1]) / work(DECODE_COST, p))

    def validation_context(self) -> dict:
        return {**super().validation_context(), "max_pixels": int(self.config["max_image_pixels"]),
                "native_size": self.native_size,
                "loras": self.loras.usable}  # called only by a request that names LoRAs: it rescans the folder

    def capabilities(self) -> dict:
        return {"schedulers": list(SCHEDULERS), "modes": ["txt2img", "img2img", "inpaint"],
                "native_size": self.native_size, "safety_checker": self.safety_checker is not None,
                **self.loras.describe()}

    # inference ----------------------------------------------------------------------------
    def run_group(self, group: Group, progress) -> list[tuple]:
        """One pipeline call for the group: per image, (PIL image, nsfw flag or None)."""
        shared = group.shared
        pipe = self.pipes[shared["mode"]]
        self.loras.activate(self.pipes["txt2img"], shared["lora_set"])  # the pipelines share its UNet and text encoder
        pipe.scheduler = SCHEDULERS[shared["scheduler"]].from_config(self.scheduler_config)  # fresh per group
        kwargs = dict(prompt=group.per_image("prompt"), negative_prompt=group.per_image("negative_prompt"),
                      num_inference_steps=shared["steps"], guidance_scale=shared["guidance_scale"],
                      generator=group.generators(), output_type="pil")
        if shared["mode"] != "img2img":
            kwargs.update(width=shared["width"], height=shared["height"])
        if shared["mode"] != "txt2img":
            kwargs.update(image=group.per_image("init_image"), strength=shared["strength"])
        if shared["mode"] == "inpaint":
            kwargs.update(mask_image=group.per_image("mask_image"))
        started = time.monotonic()
        last = stash_steps(pipe.scheduler)

        def on_step_end(pipe, i, t, tensors):  # diffusers' step callback: progress and previews
            latents = tensors["latents"]
            progress(group, i + 1, started, lambda ids: self.preview(pipe, latents[ids], group, ids))
            if group.stopped:  # deadline_s splits batches: the whole group stops at its deadline
                group.stopped.update(dict.fromkeys((p.idx for p in group.requests), i + 1))
                raise DeadlinePassed
            return tensors

        with torch.inference_mode():
            try:
                pils = pipe(**kwargs, callback_on_step_end=on_step_end).images
            except DeadlinePassed:  # the x0 estimate of the last step, decoded
                x0 = predicted_x0(pipe.scheduler, last["sample"], last["eps"], last["t"])
                pils = pipe.image_processor.postprocess(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample,
                                                        output_type="pil")
        if shared["mode"] == "inpaint":
            # Outside the mask the input's own pixels, as AUTOMATIC1111 returns them: diffusers keeps
            # them only in latent space, and the VAE decode bleeds across the mask's edge.
            pils = [pipe.image_processor.apply_overlay(mask, init, img) for mask, init, img
                    in zip(group.per_image("mask_image"), group.per_image("init_image"), pils)]
        return list(zip(pils, self.check_safety(pils)))

    def steps_total(self, params: Sd15Request) -> int:
        """The UNet steps diffusers will run: PNDM runs one more than asked, img2img and inpainting
        skip the first steps as diffusers' `get_timesteps` does (int(steps x strength) remain)."""
        scheduler = SCHEDULERS[params.scheduler].from_config(self.scheduler_config)
        scheduler.set_timesteps(params.steps)
        skipped = params.steps - params.denoising_steps
        return len(scheduler.timesteps[skipped * scheduler.order:])

    def preview(self, pipe, latents: torch.Tensor, group: Group, ids: list[int]) -> list:
        """The current latents of images `ids` as images: the VAE's decode where the request asked
        for it (`preview_vae`), else the linear latent-to-RGB fit (one pixel per latent, 1/8 size)."""
        exact = group.per_image("preview_vae")
        out = []
        for i, z in zip(ids, latents):
            if exact[i]:
                image = pipe.vae.decode(z[None] / pipe.vae.config.scaling_factor).sample
                out += pipe.image_processor.postprocess(image, output_type="pil")
            else:
                weight, bias = self.latent_rgb
                rgb = torch.einsum("chw,cr->rhw", z.float(), weight) + bias[:, None, None]
                out += tensor_to_pil(((rgb / 2 + 0.5).clamp(0, 1))[None])
        return out

    def check_safety(self, pils: list) -> list[bool | None]:
        """The weights' safety checker on the images (None per image when there is none)."""
        if self.safety_checker is None:
            return [None] * len(pils)
        pipe = self.pipes["txt2img"]
        pipe.safety_checker = self.safety_checker
        try:
            arrays = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pils])
            _, has_nsfw = pipe.run_safety_checker(arrays, self.device, self.dtype)
        finally:
            pipe.safety_checker = None
        return [bool(f) for f in has_nsfw]

    # postprocess --------------------------------------------------------------------------
    def respond(self, pending: Pending, results: list[tuple]) -> Outcome:
        req = pending.params
        pils, nsfw = [p for p, _ in results], [f for _, f in results]
        warnings = [DEMO_WARNING] if self.demo else []
        for name in ("prompt", "negative_prompt"):
            n = len(self.tokenizer(getattr(req, name), truncation=False).input_ids)
            if n > self.tokenizer.model_max_length:
                warnings.append(f"'{name}' is {n} tokens; CLIP reads the first {self.tokenizer.model_max_length} "
                                "(the rest was truncated)")
        infos = self.png_infos(req, len(pils))
        if pending.png and not nsfw[0]:
            # A raw PNG has no body for the seed and the warnings: they travel as headers.
            headers = {"X-Seed": str(req.seed), **({"X-Warnings": " | ".join(warnings)} if warnings else {})}
            return Outcome(response=encode_png(pils[0], pnginfo=infos[0]), content_type=PNG_TYPE, headers=headers)
        if any(nsfw):
            warnings.append("the safety checker flagged some images; they are withheld (null in 'images')")
        body = {
            "images": [None if flag else b64_png(p, pnginfo=info) for p, flag, info in zip(pils, nsfw, infos)],
            "seed": req.seed, "steps": req.steps, "scheduler": req.scheduler,
            "guidance_scale": req.guidance_scale, "width": req.width, "height": req.height,
            "mode": req.mode, "warnings": warnings, "request_id": req.request_id,
        }
        if req.mode != "txt2img":
            body["strength"] = req.strength
        if req.loras:
            body["loras"] = [lora.model_dump() for lora in req.loras]
        if self.safety_checker is not None:
            body["nsfw"] = nsfw
        return Outcome(response=body)


    def a1111_parameters(self, params: Sd15Request) -> str:
        # A1111 writes a prompt's LoRAs as <lora:name:scale> tags in it, and their file hashes after the settings.
        tags = "".join(f" <lora:{lora.name}:{lora.scale:g}>" for lora in params.loras)
        hashes = ", ".join(f"{lora.name}: {self.loras.hash_of(lora.name)}" for lora in params.loras)
        return provenance.a1111_parameters(params.prompt + tags, params.negative_prompt, {
            "Steps": params.steps, "Sampler": A1111_SAMPLERS[params.scheduler], "CFG scale": params.guidance_scale,
            "Seed": params.seed, "Size": f"{params.width}x{params.height}",
            "Model hash": provenance.model_hash(self.archive), "Model": self.archive.get("model"),
            "Denoising strength": params.strength, "Lora hashes": hashes or None})


def set_vae_tiles(vae, tile: int | None) -> None:
    """`tile` px: images with a side above it are decoded (and img2img's inputs encoded) in tiles
    of `tile` px overlapping by a quarter, so the VAE's peak memory is that of a tile; smaller
    images are untouched. None: whole images. diffusers' AutoencoderKL takes its tile size from
    the weights' `sample_size` and has no argument for it, hence the attributes; a tile under
    SD1.5's 512 px shows seams (docs/targets.md, "VAE tiles")."""
    if tile is None:
        vae.disable_tiling()
        return
    scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipelines compute it
    if tile < 512 or tile % scale_factor:
        raise ValueError(f"sd15: vae_tile_size {tile} must be >= 512 and a multiple of {scale_factor} (or null)")
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // scale_factor


def latent_rgb_fit(vae, device, dtype, count: int = 16, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map from the VAE's (scaled) latent channels to RGB in [-1, 1]: least squares between
    random latents (the denoising loop's N(0, 1) scale) and what the VAE decodes them to, averaged
    over each latent pixel's area. Fitted at load (one decode of 16 latents of 8x8) so it holds for
    any VAE: the SD1.5 factors ComfyUI publishes fit only SD1.5's. A linear map is a rough preview
    (docs/streaming.md)."""
    latents = torch.randn((count, vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        images = vae.decode((latents / vae.config.scaling_factor).to(device, dtype)).sample.float().cpu().clamp(-1, 1)
    targets = torch.nn.functional.adaptive_avg_pool2d(images, (side, side))
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    rgb = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([z, torch.ones(len(z), 1)], dim=1), rgb).solution
    return solution[:-1], solution[-1]
