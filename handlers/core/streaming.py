"""Streaming responses of the diffusion models: NDJSON progress, preview and result events sent
while a batch runs, and the per-worker step clock that sets the time budget.

A request opts in with `"stream": true` (a request field, not an `Accept` header: it is validated
and documented with the other fields, survives proxies that rewrite Accept, and is one `-d` in
curl). Its response is `application/x-ndjson`, one JSON object per line:

    {"event": "progress", "step": 3, "total": 10, "elapsed_s": 0.41, "eta_s": 0.96}
    {"event": "preview", "step": 5, "total": 10, "images": ["<base64 PNG>", ...]}
    {"event": "result", "response": {...exactly the non-streaming JSON response...}}
    {"event": "error", "error": "...", "field": null, "status": 500}      (instead of result)

TorchServe 0.12 sends them with `send_intermediate_predict_response` (chunked HTTP; the handler's
return value is the last chunk). Only the streaming requests of a batch are in the message's
request map, so the others of the same batch get their ordinary response, byte for byte. The
status, content type and headers of a request are fixed by its first message, so the first
event (step 0) goes out as soon as the batch is parsed, and later errors travel in-band.
TorchServe applies `responseTimeout` to each message: a streaming request only has to finish
one step within it (`BatchedHandler.check_cost`).
"""
from __future__ import annotations

import json
import time
from typing import Callable

from ts.handler_utils.utils import send_intermediate_predict_response

from handlers.core.errors import RequestError
from handlers.core.images import b64_png

NDJSON_TYPE = "application/x-ndjson"


def ndjson(events: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in events).encode("utf-8")


def progress_event(step: int, total: int, elapsed_s: float, step_elapsed_s: float) -> dict:
    """`step_elapsed_s`: time since this request's own steps began (its ETA's rate)."""
    eta = step_elapsed_s / step * (total - step) if step else None
    return {"event": "progress", "step": step, "total": total, "elapsed_s": round(elapsed_s, 3),
            "eta_s": None if eta is None else round(eta, 3)}


def preview_event(step: int, total: int, pils: list) -> dict:
    """The images of a preview as PNGs (base64)."""
    return {"event": "preview", "step": step, "total": total, "images": [b64_png(p) for p in pils]}


def result_event(response) -> dict:
    return {"event": "result", "response": response}


def error_event(err: RequestError) -> dict:
    return {"event": "error", **err.body(), "status": err.status}


def wants_preview(params, step: int, total: int) -> bool:
    """Every `preview_every` steps, except at the end (the result follows)."""
    every = params.preview_every
    return bool(every) and step % every == 0 and step < total


class StepClock:
    """Seconds per work unit (an image-step for ddpm, a 512x512 guided step for sd15) as this
    worker measured them: a warm-up at load, then every group it runs (exponential average).
    The estimate never goes below the warm-up's batch-1 figure, the slowest per unit on an idle
    worker: batched groups are faster per unit and must not talk the budget up; a busier machine
    raises it within a few groups."""

    def __init__(self, warmup_seconds_per_unit: float):
        self.floor = self.recent = float(warmup_seconds_per_unit)

    def observe(self, seconds: float, units: float) -> None:
        if units > 0:
            self.recent = 0.7 * self.recent + 0.3 * seconds / units

    @property
    def seconds_per_unit(self) -> float:
        return max(self.floor, self.recent)


def seconds_per_call(call: Callable[[], object], repeats: int = 3) -> float:
    """Mean wall time of call() after one untimed call (allocations, lazy initialisation)."""
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


class BatchStreams:
    """The streaming requests of one TorchServe batch and the messages sent for them."""

    def __init__(self, context, pendings: list, batch_size: int, steps_total: Callable):
        """`steps_total(params)`: the denoising steps a request will run (its events' `total`)."""
        self.context = context
        self.batch_size = batch_size
        self.started = time.monotonic()
        self.members = {p.idx: p for p in pendings if p.params.stream}
        self.totals = {idx: steps_total(p.params) for idx, p in self.members.items()}
        for idx in self.members:  # fixed by the first message
            context.set_response_content_type(idx, NDJSON_TYPE)
            context.set_response_header(idx, "X-Batch-Size", str(batch_size))
        self.send({idx: [progress_event(0, self.totals[idx], 0.0, 0.0)] for idx in self.members})

    def __contains__(self, idx: int) -> bool:
        return idx in self.members

    def progress(self, group, step: int, group_started: float, previews: Callable[[list[int]], list] | None) -> None:
        """After `step` steps of `group`: a progress event for each of its streaming requests, and
        previews where due. `previews(image_indexes)` renders the group's current estimate of those
        images (PIL), called once per step for all that need one."""
        now = time.monotonic()
        due: dict[int, list[int]] = {}
        messages: dict[int, list[dict]] = {}
        for p, start in zip(group.requests, group.first_images()):
            if p.idx not in self.members:
                continue
            total = self.totals[p.idx]
            messages[p.idx] = [progress_event(step, total, now - self.started, now - group_started)]
            if previews is not None and wants_preview(p.params, step, total):
                due[p.idx] = list(range(start, start + p.params.images_requested))
        if due:
            pils = iter(previews([i for ids in due.values() for i in ids]))
            for idx, ids in due.items():
                messages[idx].append(preview_event(step, self.totals[idx], [next(pils) for _ in ids]))
        self.send(messages)

    def send(self, messages: dict[int, list[dict]]) -> None:
        if not messages:
            return
        ret = [b""] * self.batch_size
        for idx, events in messages.items():
            ret[idx] = ndjson(events)
        req_id_map = {idx: self.context.request_ids[idx] for idx in messages}
        # code 200 for the whole message: a non-200 intermediate code breaks the other streams of
        # the batch (DESIGN.md); a request's own errors go in-band.
        send_intermediate_predict_response(ret, req_id_map, "Intermediate Prediction success", 200, self.context)

    @staticmethod
    def last_chunk(outcome) -> bytes:
        """A streaming request's final message: its result or error event."""
        if outcome.error is not None:
            return ndjson([error_event(outcome.error)])
        return ndjson([result_event(outcome.response)])
