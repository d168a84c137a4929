"""TorchServe handler for the `sd15` model: Stable Diffusion 1.5 txt2img, img2img and inpainting
with diffusers, all three from ONE set of components (the img2img and inpaint pipelines are built
with `from_pipe`, which shares the UNet, VAE, text encoder and tokenizer).

Requests of one TorchServe batch with the same mode, size, steps, scheduler, guidance and
strength run as one pipeline call with a list of prompts and one generator per image (a
request's images all draw from that request's own generator), so a seeded request gives the same
image alone or inside a batch. Each group gets a fresh scheduler instance.

Cost (BatchedHandler's time budget) is counted in 512x512 guided denoising steps, from FLOP
counts of the real SD1.5 UNet and VAE, so the limits hold for the real model at every size.
"""
from __future__ import annotations

import logging
import os
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from handlers.common import PNG_TYPE, BatchedHandler, Group, Outcome, Pending, timeout_budget
from handlers.errors import RequestError
from handlers.images import b64_png, decode_image, encode_png
from handlers.request import BATCHED, Base64Image, ConfigMax, SeededImages

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
DEMO_WARNING = "demo profile: a randomly initialised smoke-test model; its images are noise"
REFERENCE_PIXELS = 512 * 512
# Work per image of P = pixels / 512^2 as (a, b) in a*P + b*P^2, in units of one 512x512 denoising
# step with classifier-free guidance (the configs' steps_per_second_512). From torch.utils.flop_counter
# on the SD1.5 UNet and VAE: self-attention grows with the square of the latent size (a 1024x1024
# step is 5.8 units, not 4), and one VAE decode costs more than a step.
STEP_COST = (0.85, 0.15)
DECODE_COST = (1.54, 0.02)
ENCODE_COST = (0.67, 0.02)  # img2img encodes the input once, inpainting twice (image, masked image)
# What a transparent pixel becomes: the image is flattened on white; in the mask it means "keep".
IMAGE_BACKGROUND = (255, 255, 255)
MASK_BACKGROUND = (0, 0, 0)


class Sd15Request(SeededImages):
    """`POST /predictions/sd15`: txt2img, or img2img with `image`, or inpainting with `image` + `mask`."""

    prompt: str
    """What to draw (CLIP reads the first 77 tokens; longer prompts get a `warnings` entry)."""
    negative_prompt: str = ""
    """What to steer away from (classifier-free guidance's unconditional branch)."""
    steps: Annotated[int, Field(ge=1), ConfigMax("max_steps"), BATCHED] = 25
    """Denoising steps; img2img and inpainting run int(steps x strength) of them."""
    guidance_scale: Annotated[float, Field(ge=0.0), ConfigMax("max_guidance_scale"), BATCHED] = 7.5
    """Classifier-free guidance weight (<= 1 turns guidance off)."""
    width: Annotated[int | None, Field(ge=64, multiple_of=8), ConfigMax("max_size"), BATCHED] = None
    """Output width; null = the input image's width (rounded down to a multiple of 8), else the model's native size."""
    height: Annotated[int | None, Field(ge=64, multiple_of=8), ConfigMax("max_size"), BATCHED] = None
    """Output height; null = like width."""
    scheduler: Annotated[Literal[tuple(SCHEDULERS)], BATCHED] = "pndm"
    """diffusers scheduler, built fresh per group from the weights' scheduler config."""
    image: Base64Image | None = None
    """Input image: img2img (SDEdit), or inpainting with `mask`. Transparent pixels become white."""
    strength: Annotated[float | None, Field(gt=0.0, le=1.0), BATCHED] = None
    """How far to re-noise `image`; null = 0.75 for img2img, 1.0 for inpainting. With `image` only."""
    mask: Base64Image | None = None
    """Inpainting mask, the size of `image`: white = repaint, black (or transparent) = keep."""

    batched_properties: ClassVar[tuple[str, ...]] = ("mode",)
    _image: Image.Image | None = PrivateAttr(None)
    _mask: Image.Image | None = PrivateAttr(None)

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else "inpaint" if self.mask is not None else "img2img"

    @property
    def init_image(self) -> Image.Image | None:
        """`image` decoded and resized to width x height."""
        return self._image

    @property
    def mask_image(self) -> Image.Image | None:
        return self._mask

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo):
        """Decodes the images and resolves the defaults of strength, width and height."""
        ctx = info.context
        if self.image is None:
            for name in ("strength", "mask"):
                if getattr(self, name) is not None:
                    raise RequestError(name, f"'{name}' needs an 'image' (img2img / inpainting)")
        else:
            self._image = decode_image(self.image, "image", ctx["max_pixels"], mode="RGB", background=IMAGE_BACKGROUND)
            if self.mask is not None:
                self._mask = decode_image(self.mask, "mask", ctx["max_pixels"], mode="L", background=MASK_BACKGROUND)
                if self._mask.size != self._image.size:
                    raise RequestError("mask", f"'mask' is {self._mask.size[0]}x{self._mask.size[1]} but 'image' is "
                                               f"{self._image.size[0]}x{self._image.size[1]}; they must match")
            if self.strength is None:
                self.strength = 0.75 if self.mode == "img2img" else 1.0
            if self.denoising_steps < 1:
                raise RequestError("strength", f"'steps' x 'strength' = {self.steps} x {self.strength} leaves no "
                                               "denoising step (diffusers runs int(steps x strength)); raise "
                                               "'strength' or 'steps'")
        for axis, name in enumerate(("width", "height")):
            if getattr(self, name) is None:
                size = self._image.size[axis] // 8 * 8 if self._image is not None else ctx["native_size"]
                low, high = 64, self.limits["max_size"]
                if not low <= size <= high:
                    raise RequestError("image", f"the image's {name} ({size}) is outside {self.describe(name)}; "
                                                f"pass '{name}' to resize it")
                setattr(self, name, size)
        if self._image is not None:
            self._image = self._image.resize((self.width, self.height))
            if self._mask is not None:
                self._mask = self._mask.resize((self.width, self.height))
        return self

    @property
    def denoising_steps(self) -> int:
        """The UNet steps this request runs: img2img and inpainting start int(steps x strength) from the end."""
        return self.steps if self.mode == "txt2img" else min(int(self.steps * self.strength), self.steps)

    def cost(self) -> float:
        p = self.width * self.height / REFERENCE_PIXELS
        per_image = self.denoising_steps * work(STEP_COST, p) + work(DECODE_COST, p)
        per_image += {"txt2img": 0, "img2img": 1, "inpaint": 2}[self.mode] * work(ENCODE_COST, p)
        return self.num_images * per_image

    def cost_field(self) -> str:
        return max(("steps", "num_images", "width"), key=lambda f: getattr(self, f) / self.limits[LIMIT_OF[f]])

    def cost_summary(self) -> str:
        return f"{self.num_images} image(s) of {self.width}x{self.height} at {self.steps} steps"


LIMIT_OF = {"steps": "max_steps", "num_images": "max_num_images", "width": "max_size"}


class Sd15Handler(BatchedHandler):
    """txt2img / img2img / inpainting with batching, seeds, limits and a time budget."""

    request_type = Sd15Request

    def initialize(self, context):
        wdir = self.prepare(context)
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
        if self.config.get("attention_slicing"):
            base.enable_attention_slicing()
        if self.config.get("vae_tiling"):
            base.vae.enable_tiling()
        if self.config.get("compile"):
            base.unet = torch.compile(base.unet)
        self.pipes = {
            "txt2img": base,
            "img2img": StableDiffusionImg2ImgPipeline.from_pipe(base),
            "inpaint": StableDiffusionInpaintPipeline.from_pipe(base),
        }
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = base.scheduler.config
        self.tokenizer = base.tokenizer
        self.demo = os.path.isfile(os.path.join(wdir, "DEMO_MODEL.txt"))
        # As diffusers' pipelines do: the UNet's sample size in pixels (512 for SD1.5).
        self.native_size = int(base.unet.config.sample_size * base.vae_scale_factor)
        self.bind_request()
        self.budget = timeout_budget(context, self.config, "steps_per_second_512")
        self.initialized = True
        logger.info("sd15: loaded %s on %s (%s)%s", wdir, self.device, self.dtype, " [demo]" if self.demo else "")

    def validation_context(self) -> dict:
        return {"max_pixels": int(self.config["max_image_pixels"]), "native_size": self.native_size}

    def capabilities(self) -> dict:
        return {"schedulers": list(SCHEDULERS), "modes": ["txt2img", "img2img", "inpaint"],
                "native_size": self.native_size, "safety_checker": self.safety_checker is not None}

    # inference ----------------------------------------------------------------------------
    def run_group(self, group: Group) -> list[tuple]:
        """One pipeline call for the group: per image, (PIL image, nsfw flag or None)."""
        shared = group.shared
        pipe = self.pipes[shared["mode"]]
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
        with torch.inference_mode():
            pils = pipe(**kwargs).images
        return list(zip(pils, self.check_safety(pils)))

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
        if pending.png and not nsfw[0]:
            # A raw PNG has no body for the seed and the warnings: they travel as headers.
            headers = {"X-Seed": str(req.seed), **({"X-Warnings": " | ".join(warnings)} if warnings else {})}
            return Outcome(response=encode_png(pils[0]), content_type=PNG_TYPE, headers=headers)
        if any(nsfw):
            warnings.append("the safety checker flagged some images; they are withheld (null in 'images')")
        body = {
            "images": [None if flag else b64_png(p) for p, flag in zip(pils, nsfw)],
            "seed": req.seed, "steps": req.steps, "scheduler": req.scheduler,
            "guidance_scale": req.guidance_scale, "width": req.width, "height": req.height,
            "mode": req.mode, "warnings": warnings,
        }
        if req.mode != "txt2img":
            body["strength"] = req.strength
        if self.safety_checker is not None:
            body["nsfw"] = nsfw
        return Outcome(response=body)


def work(coefficients: tuple[float, float], p: float) -> float:
    return coefficients[0] * p + coefficients[1] * p * p
