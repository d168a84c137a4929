"""What every handler shares: the TorchServe batch turned into declared requests, grouped into
forward passes and answered one response per request, with per-request errors; request bodies;
device/dtype choice and the model config's `handler:` section.

All three handlers answer bad input the same way because they all go through this module:
HTTP 400 with `{"error": "...", "field": "..."}` for the bad request only, while the other
requests of the same TorchServe batch are answered normally.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers.core.errors import RequestError, set_error_status
from handlers.core.request import RequestModel
from handlers.core.streaming import BatchStreams, StepClock
from handlers.core import kserve  # KServe v1/v2 bodies (TS_SERVICE_ENVELOPE); see that module

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
PNG_TYPE = "image/png"


def request_body(row: Any) -> dict | bytes:
    """One TorchServe request row -> a JSON object (dict) or raw bytes.

    TorchServe already json-decodes `application/json` bodies; anything else arrives as bytes.
    A JSON body sent as form data (curl -d without a Content-Type) arrives as form fields and
    gets a 400 that says how to send it.
    """
    if not isinstance(row, dict):
        row = {"body": row}
    if "body" in row or "data" in row:
        value = row.get("body", row.get("data"))
    elif not row:
        raise RequestError("body", "empty request body")
    else:
        raise RequestError(
            "body",
            "request arrived as form data; send JSON with 'Content-Type: application/json' "
            "(curl: -H 'Content-Type: application/json') or raw image bytes",
        )
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        value = value.encode("utf-8")
    if value is None or (isinstance(value, (bytes, bytearray)) and not value):
        raise RequestError("body", "empty request body")
    if not isinstance(value, (bytes, bytearray)):  # JSON that TorchServe decoded to a non-object
        raise RequestError("body", f"JSON body must be an object, got {type(value).__name__}")
    stripped = bytes(value[:64]).lstrip()[:1]
    if stripped in (b"{", b"["):
        try:
            decoded = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("body", f"body is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise RequestError("body", f"JSON body must be an object, got {type(decoded).__name__}")
        return decoded
    return bytes(value)


def json_body(row: Any) -> dict:
    """Like request_body, for handlers that take JSON only."""
    body = request_body(row)
    if not isinstance(body, dict):
        raise RequestError("body", "body must be a JSON object with 'Content-Type: application/json'")
    return body


def handler_config(context) -> dict:
    """The `handler:` section of the archive's model-config yaml ({} when absent)."""
    return dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})


def select_device(context, config: dict) -> tuple[torch.device, torch.dtype]:
    """CUDA when TorchServe gave this worker a GPU, else CPU; dtype from the config.

    `dtype_gpu` (default float16) and `dtype_cpu` (default float32; bfloat16 allowed) in the
    `handler:` section; `threads` sets torch's intra-op threads on CPU.
    """
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        device = torch.device(f"cuda:{gpu_id}")
        dtype = getattr(torch, str(config.get("dtype_gpu", "float16")))
    else:
        device = torch.device("cpu")
        dtype = getattr(torch, str(config.get("dtype_cpu", "float32")))
        threads = int(config.get("threads", 0) or 0)
        if threads > 0:
            torch.set_num_threads(threads)
    return device, dtype


def runtime() -> dict:
    """Where this worker runs (logged at load, reported by describe): `make test-arm64` shows
    with it that the workers it tests are aarch64 processes."""
    return {"machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def model_dir(context) -> str:
    return context.system_properties["model_dir"]


def weights_dir(context) -> str:
    """Where archive.sh puts the model's weights inside the archive."""
    path = os.path.join(model_dir(context), "weights")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights directory missing from the archive: {path}")
    return path


def header(context, idx: int, name: str) -> str | None:
    """A request header, case-insensitively (TorchServe keeps the client's spelling)."""
    headers = context.get_all_request_header(idx) or {}
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name.lower() and isinstance(value, str):
            return value
    return None


def wants_png(context, idx: int) -> bool:
    accept = header(context, idx, "Accept") or ""
    return accept.split(";")[0].strip().lower() == PNG_TYPE




@dataclass
class Outcome:
    """What one request of a batch ends with: a response or an error."""

    response: Any = None
    error: RequestError | None = None
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)


@dataclass
class Pending:
    """One valid request of a batch, with what its headers asked for."""

    idx: int  # position in the TorchServe batch
    params: RequestModel
    png: bool  # `Accept: image/png` and one image: answer the PNG itself
    explain: bool  # sent to /explanations/<model>


@dataclass
class Group:
    """Requests of one batch whose batched fields are equal: run as ONE forward pass.

    `shared` holds only the batched fields and properties (`RequestModel.shared()`), so a group
    function cannot read a per-request field from another request by mistake; per-request fields
    come per image through `per_image`. Each request has its own seeded torch.Generator, repeated
    for each of its images (diffusers accepts one generator per image).
    """

    shared: dict[str, Any]
    requests: list[Pending]

    def per_image(self, name: str) -> list:
        return [getattr(p.params, name) for p in self.requests for _ in range(p.params.images_requested)]

    def generators(self) -> list[torch.Generator]:
        gens = []
        for p in self.requests:
            gen = torch.Generator(device="cpu").manual_seed(p.params.seed)
            gens += [gen] * p.params.images_requested  # a request's images draw from its own stream
        return gens

    def first_images(self) -> list[int]:
        """Index of each request's first image among the group's images."""
        starts, n = [], 0
        for p in self.requests:
            starts.append(n)
            n += p.params.images_requested
        return starts


class BatchedHandler(BaseHandler):
    """preprocess -> inference -> postprocess over a TorchServe batch with per-request errors.

    Subclasses set `request_type` (their declared RequestModel) and implement
    `run_group(group) -> one result per image` and `respond(pending, results) -> Outcome`.
    This class parses each row into the bound request type, groups requests by their batched
    fields, runs one group after another, slices the results back per request, keeps the batch
    order, turns errors into 400s for their request only, and reports the batch size in an
    `X-Batch-Size` header. BaseHandler.handle() stays the entry point, so describe
    (`GET /models/<m>?customized=true`), explain and the profiler work as TorchServe documents.

    Time budget: `budget` is the work TorchServe's responseTimeout x the config's `timeout_margin`
    holds at the speed this worker measured (`clock`, a StepClock: warm-up at load, then every
    group), counted by each request's `cost()`, or `step_cost()` for a streaming request (its
    messages reset TorchServe's timer every step). A request that alone exceeds it is refused
    (400); requests that would push the batch past it get 503 (clients retry), so TorchServe never
    kills a worker for a slow batch, on a slow board or a busy machine alike.

    Streaming (`"stream": true`, handlers/streaming.py): run_group reports each step with
    `progress()`; the batch's streaming requests get NDJSON events, the others nothing until
    their ordinary response.
    """

    request_type: type[RequestModel]
    budget: float = math.inf
    clock: StepClock | None = None
    streams: BatchStreams | None = None
    # KServe (handlers/kserve.py): the envelopes hand this handler the whole batch and set the protocol.
    kserve_native = True
    kserve_protocol: str | None = None

    def prepare(self, context) -> str:
        """Keeps the context, reads the config's `handler:` section, picks device and dtype;
        returns the archive's weights directory. Every initialize() starts with it."""
        self.context = context
        self.config = handler_config(context)
        self.device, self.dtype = select_device(context, self.config)
        logger.info("worker runtime: %s", runtime())
        return weights_dir(context)

    def bind_request(self, model_limits: dict | None = None) -> None:
        """The request type with this archive's limits: the config's `handler:` section, plus
        limits that come from the model itself (e.g. the number of classes)."""
        self.request = type(self).request_type.bind({**self.config, **(model_limits or {})})

    def start_clock(self, warmup_seconds_per_unit: float) -> None:
        """Diffusion handlers: the time budget follows the speed this worker measures."""
        if "timeout_margin" not in self.config:
            raise KeyError("model config lacks handler.timeout_margin (needed for the time budget)")
        self.clock = StepClock(warmup_seconds_per_unit)
        self.update_budget()

    def update_budget(self) -> None:
        timeout_s = float(self.context.model_yaml_config["responseTimeout"])
        self.budget = timeout_s * float(self.config["timeout_margin"]) / self.clock.seconds_per_unit

    def validation_context(self) -> dict:
        """What a request's validators need beyond the body (image limits, the model's size)."""
        return {}

    # preprocess ----------------------------------------------------------------------------
    def preprocess(self, data: list) -> list:
        if self.kserve_protocol:  # KServe v1/v2 bodies (handlers/kserve.py)
            return kserve.preprocess(self, data)
        parsed = []
        for idx, row in enumerate(data):
            try:
                parsed.append(self.admit(idx, row))
            except RequestError as err:
                parsed.append(err)
        return parsed

    def admit(self, idx: int, row: Any) -> Pending:
        """One row of the batch -> a valid request within the time budget, with what its headers ask."""
        params = self.parse(row)
        self.check_cost(params)
        png = wants_png(self.context, idx) and params.images_requested == 1 and not streaming(params)
        return Pending(idx, params, png=png, explain=header(self.context, idx, "explain") == "True")

    def parse(self, row: Any) -> RequestModel:
        """One row -> the bound request (JSON bodies; cam also takes raw image bytes)."""
        return self.request.parse(json_body(row), self.validation_context())

    def check_cost(self, params: RequestModel) -> None:
        need = charge(params)
        if need > self.budget:
            name = params.cost_field()
            what = "one step of " + params.cost_summary() if streaming(params) else params.cost_summary()
            hint = "" if streaming(params) else ", or stream it (\"stream\": true: the limit is then per step)"
            raise RequestError(name, f"{what} cannot finish within this server's response timeout "
                                     f"(at most {self.budget:.0f} work units per batch at this worker's measured "
                                     f"speed; this request needs {need:.0f}); lower '{name}'{hint}")

    # inference -----------------------------------------------------------------------------
    def inference(self, parsed: list, *args, **kwargs) -> list[Outcome]:
        spent = 0.0
        for i, req in enumerate(parsed):
            if isinstance(req, Pending):
                spent += charge(req.params)
                if spent > self.budget:
                    parsed[i] = RequestError(None, "server busy: this batch is at its time budget; retry", 503)
        outcomes = [Outcome(error=p) if isinstance(p, RequestError) else None for p in parsed]
        groups: dict[tuple, list[Pending]] = {}
        for p in parsed:
            if isinstance(p, Pending):
                groups.setdefault(p.params.batch_key(), []).append(p)
        # In-process callers (benchmarks) have no request ids: nothing to stream to.
        streamed = getattr(self.context, "request_ids", None) and [
            p for p in parsed if isinstance(p, Pending) and streaming(p.params)]
        self.streams = BatchStreams(self.context, streamed, len(parsed), self.steps_total) if streamed else None
        for members in groups.values():
            group = Group(shared=members[0].params.shared(), requests=members)
            try:
                started = time.perf_counter()
                results = self.run_group(group)
                if self.clock is not None:
                    self.clock.observe(time.perf_counter() - started, sum(p.params.cost() for p in members))
                    self.update_budget()
                answers, start = [], 0
                for p in members:
                    n = p.params.images_requested
                    answers.append(self.respond(p, results[start : start + n]))
                    start += n
            except RequestError as err:
                answers = [Outcome(error=err)] * len(members)
            except Exception as exc:  # noqa: BLE001 - one failing group must not fail the batch
                logger.exception("group of %d requests failed", len(members))
                err = RequestError(None, f"internal error: {type(exc).__name__}: {exc}", status=500)
                answers = [Outcome(error=err)] * len(members)
            for p, answer in zip(members, answers):
                outcomes[p.idx] = answer
        return outcomes

    # postprocess ---------------------------------------------------------------------------
    def postprocess(self, outcomes: list[Outcome]) -> list:
        if self.kserve_protocol:  # KServe v1/v2 responses (handlers/kserve.py)
            return kserve.postprocess(self, outcomes)
        out = []
        for idx, oc in enumerate(outcomes):
            if self.streams is not None and idx in self.streams:  # status and headers went out with its first event
                out.append(self.streams.last_chunk(oc))
                continue
            self.context.set_response_header(idx, "X-Batch-Size", str(len(outcomes)))
            for key, value in oc.headers.items():
                self.context.set_response_header(idx, key, value)
            if oc.error is not None:
                set_error_status(self.context, idx, oc.error)
                self.context.set_response_content_type(idx, JSON_TYPE)
                out.append(json.dumps(oc.error.body()))
            else:
                self.context.set_response_content_type(idx, oc.content_type)
                resp = oc.response
                out.append(resp if isinstance(resp, (bytes, bytearray)) else json.dumps(resp))
        return out

    # BaseHandler's other paths -------------------------------------------------------------
    def explain_handle(self, data_preprocess, raw_data):
        """`POST /explanations/<model>`: the same path; each request's `explain` flag picks its answer."""
        return self.postprocess(self.inference(data_preprocess))

    def describe_handle(self) -> str:
        """`GET /models/<model>?customized=true`: what this archive accepts and what it is."""
        manifest = getattr(self.context, "manifest", None) or {}
        return json.dumps({
            "model": self.context.model_name,
            "version": (manifest.get("model") or {}).get("modelVersion"),
            **self.archive_info(),
            "runtime": runtime(),
            "request_schema": self.request.json_schema(),
            **self.capabilities(),
        })

    def archive_info(self) -> dict:
        """Profile and target archive.sh wrote into the archive (archive.json)."""
        path = os.path.join(model_dir(self.context), "archive.json")
        if not os.path.isfile(path):
            return {"profile": None, "target": None}
        with open(path) as f:
            info = json.load(f)
        return {"profile": info.get("profile"), "target": info.get("target")}

    def capabilities(self) -> dict:
        """Model-specific lists for describe (schedulers, CAM methods)."""
        return {}

    # Subclass API --------------------------------------------------------------------------
    def progress(self, group: Group, step: int, group_started: float, previews=None) -> None:
        """run_group calls this after each step: events for the group's streaming requests.
        `previews(image_indexes) -> PIL images` renders the current estimate, only when one is due."""
        if self.streams is not None:
            self.streams.progress(group, step, group_started, previews)

    def steps_total(self, params: RequestModel) -> int:
        """The denoising steps a request runs: what its progress events count to."""
        return params.steps

    def run_group(self, group: Group) -> list:
        raise NotImplementedError

    def respond(self, pending: Pending, results: list) -> Outcome:
        raise NotImplementedError


def streaming(params: RequestModel) -> bool:
    return bool(getattr(params, "stream", False))


def charge(params: RequestModel) -> float:
    """What a request takes of a batch's time budget: all its work, or for a streaming request the
    work between two of its messages (TorchServe's timer restarts at every message)."""
    return params.step_cost() if streaming(params) else params.cost()
