"""The hooks a served model implements, and what every model shares: its config (the model
config's `handler:` section), device and dtype, its bound request type and its time budget.

A model is loaded from its weights directory and answers groups of requests:

    parse(body) -> request            one request body -> the declared, validated request
    run_group(group, progress) -> results, one per image of the group (one forward pass)
    respond(pending, results) -> Outcome, one per request: the JSON (or PNG) answer

The loops (handlers/core/loops.py) group, budget, stream and answer; a server adapter
(handlers/adapter/) only moves requests in and replies out.
"""
from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo

from handlers.core import provenance
from handlers.core.batch import Group, Outcome, Pending
from handlers.core.bodies import json_body
from handlers.core.budget import StepClock, TimeBudget
from handlers.core.precision import warn_without_bf16
from handlers.core.request import RequestModel

logger = logging.getLogger(__name__)

# run_group's progress callback: (group, step, group_started, previews or None) -> None
Progress = Callable[..., None]


def configured_dtype(config: dict, cuda: bool) -> torch.dtype:
    """The dtype a worker runs in: `dtype_gpu` on CUDA (float16 when a config for CPUs leaves it
    out), else `dtype_cpu` (float32 when a config for GPUs leaves it out), from the `handler:` section."""
    name = config.get("dtype_gpu", "float16") if cuda else config.get("dtype_cpu", "float32")
    return getattr(torch, str(name))


def select_device(gpu_id: int | None, config: dict) -> tuple[torch.device, torch.dtype]:
    """CUDA when the server gave this worker a GPU, else CPU, with `configured_dtype`; `threads`
    sets torch's intra-op threads on CPU (0 or absent: torch's default)."""
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}"), configured_dtype(config, cuda=True)
    threads = int(config.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    dtype = configured_dtype(config, cuda=False)
    warn_without_bf16("dtype_cpu", dtype)
    return torch.device("cpu"), dtype


def runtime() -> dict:
    """Where this worker runs (logged at load, reported by describe): `make test-arm64` shows
    with it that the workers it tests are aarch64 processes."""
    return {"machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


class ServedModel:
    """Base of every model. Subclasses set `request_type`, load their weights in `__init__`
    (after calling this one), then call `bind_request()` and, when requests vary in cost,
    `start_clock()`."""

    request_type: type[RequestModel]
    # A model with the step hooks of handlers/core/loops.py StepLoop sets it.
    can_step = False

    def __init__(self, weights: str, config: dict, device: torch.device, dtype: torch.dtype,
                 response_timeout_s: float):
        self.weights = weights
        self.config = config
        self.device, self.dtype = device, dtype
        self.budget = TimeBudget(response_timeout_s, float(config.get("timeout_margin", 1.0)))
        # What the server adapter knows of the archive: model, version, profile, target,
        # fingerprint, weights_sha256 (archive.json); the generated PNGs record it.
        self.archive: dict[str, Any] = {}
        logger.info("worker runtime: %s", runtime())

    def bind_request(self, model_limits: dict | None = None) -> None:
        """The request type with this archive's limits: the config's `handler:` section, plus
        limits that come from the model itself (e.g. the number of classes)."""
        self.request = type(self).request_type.bind({**self.config, **(model_limits or {})})

    def start_clock(self, warmup_seconds_per_unit: float) -> None:
        """The time budget follows the speed this worker measures (diffusion models)."""
        if "timeout_margin" not in self.config:
            raise KeyError("model config lacks handler.timeout_margin (needed for the time budget)")
        self.budget.clock = StepClock(warmup_seconds_per_unit)

    # hooks -----------------------------------------------------------------------------------
    def validation_context(self) -> dict:
        """What a request's validators need beyond the body (image limits, the model's size)."""
        return {"max_deadline_s": self.budget.timeout_s * self.budget.margin}

    def parse(self, body: Any) -> RequestModel:
        """One request body (a JSON object or raw bytes) -> the bound request."""
        return self.request.parse(json_body(body), self.validation_context())

    def png_ok(self, params: RequestModel) -> bool:
        """Whether this request's answer can be the PNG itself (Accept: image/png)."""
        return params.images_requested == 1 and not getattr(params, "stream", False)

    def run_group(self, group: Group, progress: Progress) -> list:
        """One forward pass for the group: one result per image."""
        raise NotImplementedError

    def respond(self, pending: Pending, results: list) -> Outcome:
        """One request's answer from its images' results."""
        raise NotImplementedError

    def steps_total(self, params: RequestModel) -> int:
        """The denoising steps a request runs: what its progress events count to."""
        return params.steps

    def capabilities(self) -> dict:
        """Model-specific lists for describe (schedulers, CAM methods)."""
        return {}

    def a1111_parameters(self, params: RequestModel) -> str:
        """AUTOMATIC1111's infotext of a generation request (models that generate images)."""
        raise NotImplementedError

    def png_infos(self, params: RequestModel, count: int) -> list[PngInfo | None]:
        """The text chunks of each of a request's `count` PNGs (handlers/core/provenance.py), or
        None each when the request says `"metadata": false`."""
        if not params.metadata:
            return [None] * count
        text, request, where = self.a1111_parameters(params), params.recorded(), runtime()
        return [provenance.png_info(text, provenance.record(request, i, self.archive, where)) for i in range(count)]

    def describe(self) -> dict:
        """What this model accepts and where it runs."""
        return {"runtime": runtime(), "request_schema": self.request.json_schema(), **self.capabilities()}
