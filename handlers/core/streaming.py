"""Streaming responses of the diffusion models: NDJSON progress and preview events sent while a
batch runs, through the server's `Channel`.

A request opts in with `"stream": true` (a request field, not an `Accept` header: it is validated
and documented with the other fields, survives proxies that rewrite Accept, and is one `-d` in
curl). Its response is `application/x-ndjson`, one JSON object per line:

    {"event": "progress", "step": 3, "total": 10, "elapsed_s": 0.41, "eta_s": 0.96}
    {"event": "preview", "step": 5, "total": 10, "images": ["<base64 PNG>", ...]}
    {"event": "result", "response": {...exactly the non-streaming JSON response...}}
    {"event": "error", "error": "...", "field": null, "status": 500}      (instead of result)
    {"event": "cancelled", "error": "...", "stopped_at_step": 4, ..., "status": 499}   (docs/jobs.md)

Only the streaming requests of a batch get messages before the end, so the others of the same
batch get their ordinary response, byte for byte. A request's status, content type and headers go
out with its first message, so the first event (step 0) is sent as soon as the batch is admitted,
and later errors travel in-band. A server that restarts its timeout at every message needs a
streaming request to finish only one step within it (`TimeBudget.check`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from handlers.core import answers
from handlers.core.answers import Reply
from handlers.core.batch import Group, Pending
from handlers.core.images import b64_png


class Channel(Protocol):
    """How the server sends a request's messages before its last one."""

    def open(self, idx: int, head: Reply) -> None:
        """Fixes status, content type and headers of request `idx` (of the server batch)."""

    def send(self, chunks: dict[int, bytes]) -> None:
        """One message for each request in `chunks`; the others of the batch get nothing."""


def eta_s(step_elapsed_s: float, step: int, total: int) -> float | None:
    """Seconds left at the rate of the steps done so far (`step_elapsed_s` since the first began); None before one."""
    return step_elapsed_s / step * (total - step) if step else None


def progress_event(step: int, total: int, elapsed_s: float, step_elapsed_s: float) -> dict:
    """`step_elapsed_s`: time since this request's own steps began (its ETA's rate)."""
    eta = eta_s(step_elapsed_s, step, total)
    return {"event": "progress", "step": step, "total": total, "elapsed_s": round(elapsed_s, 3),
            "eta_s": None if eta is None else round(eta, 3)}


def preview_event(step: int, total: int, pils: list) -> dict:
    """The images of a preview as PNGs (base64)."""
    return {"event": "preview", "step": step, "total": total, "images": [b64_png(p) for p in pils]}


def wants_preview(params, step: int, total: int) -> bool:
    """Every `preview_every` steps, except at the end (the result follows)."""
    every = params.preview_every
    return bool(every) and step % every == 0 and step < total


class BatchStreams:
    """The streaming requests of one static batch and the messages sent for them; made and
    dropped by the loop that runs the batch."""

    def __init__(self, channel: Channel, pendings: list[Pending], batch_size: int,
                 steps_total: Callable):
        """`steps_total(params)`: the denoising steps a request will run (its events' `total`)."""
        self.channel = channel
        self.started = time.monotonic()
        self.members = {p.idx: p for p in pendings if p.streaming}
        self.totals = {idx: steps_total(p.params) for idx, p in self.members.items()}
        for p in self.members.values():
            channel.open(p.origin, answers.stream_head(batch_size))
        self.send({idx: [progress_event(0, self.totals[idx], 0.0, 0.0)] for idx in self.members})

    def __contains__(self, idx: int) -> bool:
        return idx in self.members

    def progress(self, group: Group, step: int, group_started: float,
                 previews: Callable[[list[int]], list] | None) -> None:
        """After `step` steps of `group`: a progress event for each of its streaming requests, and
        previews where due. `previews(image_indexes)` renders the group's current estimate of those
        images (PIL), called once per step for all that need one."""
        now = time.monotonic()
        due: dict[int, list[int]] = {}
        messages: dict[int, list[dict]] = {}
        for p, start in zip(group.requests, group.first_images()):
            if p.idx not in self.members or p.idx in group.cancelled:
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
        if messages:
            self.channel.send({self.members[idx].origin: answers.ndjson(events, request_id_of(self.members[idx]))
                               for idx, events in messages.items()})


def request_id_of(pending: Pending) -> str | None:
    """A generation request's id (its stream events carry it); None for models without ids."""
    return getattr(getattr(pending, "params", None), "request_id", None)


def no_progress(group: Group, step: int, group_started: float, previews=None) -> None:
    """The progress callback of a group without streaming requests."""
