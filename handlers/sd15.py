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

from handlers.common import (
    PNG_TYPE,
    SEED_PARAM,
    BatchedHandler,
    Outcome,
    Param,
    RequestError,
    b64_png,
    decode_image,
    encode_png,
    json_body,
    parse_params,
    resolve_seed,
    timeout_budget,
    wants_png,
)

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


class Sd15Handler(BatchedHandler):
    """txt2img / img2img / inpainting with batching, seeds, limits and a time budget."""

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
        self.max_pixels = int(self.config.get("max_image_pixels", 16_000_000))
        self.budget = timeout_budget(context, self.config, "steps_per_second_512")
        max_size = int(self.config.get("max_size", 1024))
        self.spec = {
            "prompt": Param(str),
            "negative_prompt": Param(str, ""),
            "steps": Param(int, 25, minimum=1, maximum=int(self.config.get("max_steps", 150))),
            "guidance_scale": Param(float, 7.5, minimum=0.0, maximum=30.0),
            "width": Param(int, None, minimum=64, maximum=max_size, nullable=True),
            "height": Param(int, None, minimum=64, maximum=max_size, nullable=True),
            "seed": SEED_PARAM,
            "scheduler": Param(str, "pndm", choices=tuple(SCHEDULERS)),
            "num_images": Param(int, 1, minimum=1, maximum=int(self.config.get("max_num_images", 4))),
            "image": Param(str, None, nullable=True),
            "strength": Param(float, None, minimum=0.0, maximum=1.0, exclusive_minimum=True, nullable=True),
            "mask": Param(str, None, nullable=True),
        }
        self.initialized = True
        logger.info("sd15: loaded %s on %s (%s)%s", wdir, self.device, self.dtype, " [demo]" if self.demo else "")

    # preprocess ---------------------------------------------------------------------------
    def parse(self, row, idx: int) -> dict:
        p = parse_params(json_body(row), self.spec)
        warnings = [DEMO_WARNING] if self.demo else []
        if p["image"] is None:
            for name in ("strength", "mask"):
                if p[name] is not None:
                    raise RequestError(name, f"'{name}' needs an 'image' (img2img / inpainting)")
            p["mode"] = "txt2img"
        else:
            p["mode"] = "inpaint" if p["mask"] is not None else "img2img"
            p["image"] = decode_image(p["image"], "image", self.max_pixels, mode="RGB")
            if p["mask"] is not None:
                p["mask"] = decode_image(p["mask"], "mask", self.max_pixels, mode="L")
                if p["mask"].size != p["image"].size:
                    raise RequestError("mask", f"'mask' is {p['mask'].size[0]}x{p['mask'].size[1]} but 'image' is "
                                               f"{p['image'].size[0]}x{p['image'].size[1]}; they must match")
            if p["strength"] is None:
                p["strength"] = 0.75 if p["mode"] == "img2img" else 1.0
            if denoising_steps(p) < 1:
                raise RequestError("strength", f"'steps' x 'strength' = {p['steps']} x {p['strength']} leaves no "
                                               "denoising step (diffusers runs int(steps x strength)); raise "
                                               "'strength' or 'steps'")
        for name in ("width", "height"):
            if p[name] is None:
                # Default: the input image's size (rounded down to a multiple of 8), else 512.
                size = p["image"].size[0 if name == "width" else 1] // 8 * 8 if p["image"] is not None else 512
                p[name] = validate_size(name, size, self.spec[name])
            elif p[name] % 8:
                raise RequestError(name, f"'{name}' must be a multiple of 8, got {p[name]}")
        if p["image"] is not None:
            p["image"] = p["image"].resize((p["width"], p["height"]))
            if p["mask"] is not None:
                p["mask"] = p["mask"].resize((p["width"], p["height"]))
        for name in ("prompt", "negative_prompt"):
            n = len(self.tokenizer(p[name], truncation=False).input_ids)
            if n > self.tokenizer.model_max_length:
                warnings.append(f"'{name}' is {n} tokens; CLIP reads the first {self.tokenizer.model_max_length} "
                                "(the rest was truncated)")
        p["warnings"] = warnings
        field = max(("steps", "num_images", "width"), key=lambda f: p[f] / self.spec[f].maximum)
        self.check_cost(p, field, f"{p['num_images']} image(s) of {p['width']}x{p['height']} at {p['steps']} steps")
        p["seed"] = resolve_seed(p["seed"])
        p["png"] = wants_png(self.context, idx) and p["num_images"] == 1
        return p

    def cost(self, req: dict) -> float:
        p = req["width"] * req["height"] / REFERENCE_PIXELS
        per_image = denoising_steps(req) * work(STEP_COST, p) + work(DECODE_COST, p)
        per_image += {"txt2img": 0, "img2img": 1, "inpaint": 2}[req["mode"]] * work(ENCODE_COST, p)
        return req["num_images"] * per_image

    def group_key(self, req: dict):
        return (req["mode"], req["width"], req["height"], req["steps"], req["scheduler"],
                req["guidance_scale"], req["strength"])

    # inference ----------------------------------------------------------------------------
    def run_group(self, reqs: list[dict]) -> list[Outcome]:
        first = reqs[0]
        pipe = self.pipes[first["mode"]]
        pipe.scheduler = SCHEDULERS[first["scheduler"]].from_config(self.scheduler_config)  # fresh per group
        prompts, negatives, generators, images, masks = [], [], [], [], []
        for req in reqs:
            gen = torch.Generator(device="cpu").manual_seed(req["seed"])
            for _ in range(req["num_images"]):
                prompts.append(req["prompt"])
                negatives.append(req["negative_prompt"])
                generators.append(gen)
                images.append(req["image"])
                masks.append(req["mask"])
        kwargs = dict(prompt=prompts, negative_prompt=negatives, num_inference_steps=first["steps"],
                      guidance_scale=first["guidance_scale"], generator=generators, output_type="pil")
        if first["mode"] == "txt2img":
            kwargs.update(width=first["width"], height=first["height"])
        else:
            kwargs.update(image=images, strength=first["strength"])
        if first["mode"] == "inpaint":
            kwargs.update(mask_image=masks, width=first["width"], height=first["height"])
        with torch.inference_mode():
            pils = pipe(**kwargs).images
        flagged = self.check_safety(pils)
        outcomes, start = [], 0
        for req in reqs:
            mine, nsfw = pils[start : start + req["num_images"]], flagged[start : start + req["num_images"]]
            start += req["num_images"]
            outcomes.append(self.respond(req, mine, nsfw))
        return outcomes

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
    def respond(self, req: dict, pils: list, nsfw: list[bool | None]) -> Outcome:
        warnings = list(req["warnings"])
        if req["png"] and not nsfw[0]:
            # A raw PNG has no body for the seed and the warnings: they travel as headers.
            headers = {"X-Seed": str(req["seed"]), **({"X-Warnings": " | ".join(warnings)} if warnings else {})}
            return Outcome(response=encode_png(pils[0]), content_type=PNG_TYPE, headers=headers)
        if any(nsfw):
            warnings.append("the safety checker flagged some images; they are withheld (null in 'images')")
        body = {
            "images": [None if flag else b64_png(p) for p, flag in zip(pils, nsfw)],
            "seed": req["seed"], "steps": req["steps"], "scheduler": req["scheduler"],
            "guidance_scale": req["guidance_scale"], "width": req["width"], "height": req["height"],
            "mode": req["mode"], "warnings": warnings,
        }
        if req["mode"] != "txt2img":
            body["strength"] = req["strength"]
        if self.safety_checker is not None:
            body["nsfw"] = nsfw
        return Outcome(response=body)


def denoising_steps(req: dict) -> int:
    """The UNet steps a request runs: img2img and inpainting start int(steps x strength) from the end."""
    return req["steps"] if req["mode"] == "txt2img" else min(int(req["steps"] * req["strength"]), req["steps"])


def work(coefficients: tuple[float, float], p: float) -> float:
    return coefficients[0] * p + coefficients[1] * p * p


def validate_size(name: str, size: int, param: Param) -> int:
    if not param.minimum <= size <= param.maximum:
        raise RequestError("image", f"the image's {name} ({size}) is outside {param.describe()}; "
                                    f"pass '{name}' to resize it")
    return size
