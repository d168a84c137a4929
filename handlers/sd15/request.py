"""The `sd15` model's request: every field with its default, limits and documentation, which
fields split a batch, how defaults resolve (strength, width, height from the input image or the
model's native size) and what a request costs. handlers/sd15.py and docs/api/sd15.schema.json read it.

Cost (BatchedHandler's time budget) is counted in 512x512 guided denoising steps, from FLOP
counts of the real SD1.5 UNet and VAE, so the limits hold for the real model at every size.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from handlers.core.errors import RequestError
from handlers.core.images import decode_image
from handlers.core.request import BATCHED, Base64Image, ConfigMax, SeededImages

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
# AUTOMATIC1111's names of the same samplers, for the `parameters` text of the PNGs (SD1.5's PNDM
# config skips the Runge-Kutta warm-up: the pseudo linear multistep method, A1111's PLMS).
A1111_SAMPLERS = {"pndm": "PLMS", "ddim": "DDIM", "euler": "Euler", "dpm++": "DPM++ 2M"}
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


class Lora(BaseModel):
    """One LoRA a request applies: `{"name": "my-style", "scale": 0.8}`."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    name: str
    """A LoRA file of the target's `lora_dir`, without `.safetensors` (describe lists them)."""
    scale: float = 1.0
    """Its weight: 1 = as trained, 0 = the base model's image; within the target's `lora_scales`."""


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

    loras: list[Lora] = Field(default_factory=list)
    """LoRAs to apply, e.g. `[{"name": "my-style", "scale": 0.8}]`: at most the target's `max_loras`,
    their loaded size within its `lora_cache_mb`. Requests with different LoRAs never share a UNet call."""

    preview_vae: bool = False
    """With `stream`: previews decoded by the VAE (exact, but each costs about 1.6 denoising steps (a VAE decode))
    instead of the default linear latent-to-RGB approximation (free, blurry, 1/8 of the size)."""

    # deadline_s too: diffusers' pipeline cannot drop rows mid-loop, so a group stops as a whole.
    batched_properties: ClassVar[tuple[str, ...]] = ("mode", "lora_set", "deadline_s")
    _image: Image.Image | None = PrivateAttr(None)
    _mask: Image.Image | None = PrivateAttr(None)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_json_text(cls, value):
        """A JSON text of the list is read as the list: a KServe v2 BYTES input or a form field carries strings only."""
        if isinstance(value, (str, bytes)):
            try:
                return json.loads(value)
            except ValueError:
                raise RequestError("loras", "'loras' must be a list of objects with 'name', 'scale' (or that list's "
                                            f"JSON text), got {value[:40]!r}") from None
        return value

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else "inpaint" if self.mask is not None else "img2img"

    @property
    def lora_set(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs as (name, scale) pairs in name order: equal for requests that apply the same set."""
        return tuple(sorted((lora.name, lora.scale) for lora in self.loras))

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
        self._check_loras(ctx["loras"])
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

    def _check_loras(self, usable_loras: Callable[[], dict[str, int]]) -> None:
        """The LoRAs exist in the folder (`usable_loras()`: name -> loaded bytes), each once, within
        the target's count, scale and memory limits."""
        if not self.loras:
            return
        usable = usable_loras()
        most, (low, high), budget = self.limits["max_loras"], self.limits["lora_scales"], self.limits["lora_cache_mb"]
        if len(self.loras) > most:
            raise RequestError("loras", f"at most {most} LoRAs per request (max_loras), got {len(self.loras)}")
        names = [lora.name for lora in self.loras]
        for i, lora in enumerate(self.loras):
            if lora.name not in usable:
                listed = ", ".join(sorted(usable)) or "none"
                raise RequestError("loras", f"unknown LoRA '{lora.name}' (loras[{i}].name); available: {listed}")
            if names.count(lora.name) > 1:
                raise RequestError("loras", f"LoRA '{lora.name}' is named twice")
            if not low <= lora.scale <= high:
                raise RequestError("loras", f"loras[{i}].scale must be in [{low}, {high}] (lora_scales), got {lora.scale}")
        need = sum(usable[n] for n in names) / 2**20
        if need > budget:
            raise RequestError("loras", f"these LoRAs take {need:.1f} MB loaded; the cache holds {budget} MB (lora_cache_mb)")

    @property
    def denoising_steps(self) -> int:
        """The UNet steps this request runs: img2img and inpainting start int(steps x strength) from the end."""
        return self.steps if self.mode == "txt2img" else min(int(self.steps * self.strength), self.steps)

    @classmethod
    def stream_fields(cls) -> tuple[str, ...]:
        return ("preview_every", "preview_vae")

    def previews(self) -> int:
        """VAE-decoded previews this request asks for (the approximate ones cost nothing)."""
        if not (self.stream and self.preview_vae and self.preview_every):
            return 0
        return (self.denoising_steps - 1) // self.preview_every

    def cost(self) -> float:
        p = self.width * self.height / REFERENCE_PIXELS
        per_image = self.denoising_steps * work(STEP_COST, p) + self.once_per_image(p)
        return self.num_images * (per_image + self.previews() * work(DECODE_COST, p))

    def once_per_image(self, p: float) -> float:
        """Encoding the inputs and decoding the result."""
        return work(DECODE_COST, p) + {"txt2img": 0, "img2img": 1, "inpaint": 2}[self.mode] * work(ENCODE_COST, p)

    def step_cost(self) -> float:
        p = self.width * self.height / REFERENCE_PIXELS
        step = work(STEP_COST, p) + (work(DECODE_COST, p) if self.previews() else 0.0)
        return self.num_images * max(step, self.once_per_image(p))

    def cost_field(self) -> str:
        return max(("steps", "num_images", "width"), key=lambda f: getattr(self, f) / self.limits[LIMIT_OF[f]])

    def cost_summary(self) -> str:
        return f"{self.num_images} image(s) of {self.width}x{self.height} at {self.steps} steps"


LIMIT_OF = {"steps": "max_steps", "num_images": "max_num_images", "width": "max_size"}


def work(coefficients: tuple[float, float], p: float) -> float:
    return coefficients[0] * p + coefficients[1] * p * p
