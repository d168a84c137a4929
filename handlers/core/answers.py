"""The one place that writes a request's answer: the model's JSON or PNG, NDJSON stream events,
KServe v1 / v2 bodies, and errors, each as a `Reply` (status, content type, headers, body) that
the server adapter copies onto the wire unchanged.

Errors are answered per request: `{"error": "...", "field": "..."}` with the error's status, or
for KServe `{"error": "<field>: ..."}`. A request whose first message already went out (a stream,
a step-level request still running) has a fixed status: a later error travels in its body
(`later`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from handlers.core import kserve
from handlers.core.batch import JSON_TYPE, KSERVE_V1, NDJSON_TYPE, OWN_ANSWER, Admitted, Outcome
from handlers.core.errors import RequestError

BATCH_SIZE_HEADER = "X-Batch-Size"


@dataclass
class Reply:
    """One response message of one request."""

    body: bytes | str
    status: int = 200
    reason: str = "OK"
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    head: bool = True  # False: status, content type and headers went out with an earlier message


def _encode(body: Any) -> bytes | str:
    return body if isinstance(body, (bytes, bytearray)) else json.dumps(body)


def error_reply(err: RequestError, message: str | None = None, body: dict | None = None,
                headers: dict | None = None) -> Reply:
    return Reply(json.dumps(body if body is not None else {"error": message or err.message}),
                 status=err.status, reason=err.reason, headers=dict(headers or {}))


def rest(outcome: Outcome, batch_size: int) -> Reply:
    """The model's own answer: its JSON or PNG with its headers, or the error body."""
    headers = {BATCH_SIZE_HEADER: str(batch_size), **outcome.headers}
    if outcome.error is not None:
        return error_reply(outcome.error, body=outcome.error.body(), headers=headers)
    return Reply(_encode(outcome.response), content_type=outcome.content_type, headers=headers)


def running(content_type: str, batch_size: int, body: bytes = b"") -> Reply:
    """The first message of a request that goes on after it (a stream, a step-level request)."""
    return Reply(body, content_type=content_type, headers={BATCH_SIZE_HEADER: str(batch_size)})


def later(body: bytes) -> Reply:
    """A message after the first: the body only."""
    return Reply(body, head=False)


# NDJSON events ------------------------------------------------------------------------------
def ndjson(events: list[dict], request_id: str | None = None) -> bytes:
    """NDJSON lines; each event carries the request's id when it has one."""
    tag = {"request_id": request_id} if request_id else {}
    return "".join(json.dumps({**e, **tag}) + "\n" for e in events).encode("utf-8")


def result_event(response) -> dict:
    return {"event": "result", "response": response}


def error_event(err: RequestError) -> dict:
    """A stream's last event when it ends without a result: `cancelled` (handlers/core/jobs.py) or `error`."""
    return {"event": "cancelled" if err.extra.get("cancelled") else "error", **err.body(), "status": err.status}


def stream_head(batch_size: int) -> Reply:
    return running(NDJSON_TYPE, batch_size)


def stream_end(outcome: Outcome, events: list[dict] | None = None, request_id: str | None = None) -> bytes:
    """A stream's last message: its pending events, then its result or error event."""
    last = error_event(outcome.error) if outcome.error is not None else result_event(outcome.response)
    return ndjson([*(events or []), last], request_id)


# KServe -------------------------------------------------------------------------------------
def kserve_reply(req: Admitted, outcomes: list[Outcome], batch_size: int, model_name: str,
                 model_version: str | None) -> Reply:
    """One KServe request's answer from the outcomes of its model requests."""
    headers = {BATCH_SIZE_HEADER: str(batch_size)}
    if req.error is not None:
        return error_reply(req.error, kserve.where("", req.error), headers=headers)
    for label, i in req.members:
        if outcomes[i].error is not None:
            return error_reply(outcomes[i].error, kserve.where(label, outcomes[i].error), headers=headers)
    answers = [outcomes[i] for _, i in req.members]
    for oc in answers:
        headers.update(oc.headers)
    if req.incoming.protocol == KSERVE_V1:
        key = "explanations" if req.incoming.explain else "predictions"
        return Reply(json.dumps({key: [oc.response for oc in answers]}), headers=headers)
    tensors = [kserve.tensor(k, v) for k, v in answers[0].response.items()]
    if req.wanted_outputs is not None:
        known = {t["name"] for t in tensors}
        unknown = [n for n in req.wanted_outputs if n not in known]
        if unknown:
            err = RequestError("outputs", f"unknown output {unknown[0]!r} (this model answers {sorted(known)})")
            return error_reply(err, kserve.where("", err), headers=headers)
        tensors = [t for t in tensors if t["name"] in req.wanted_outputs]
    body = {"id": req.v2_id or req.incoming.request_id, "model_name": model_name,
            "model_version": model_version, "outputs": tensors}
    return Reply(json.dumps(body), headers=headers)


def refused(req: Admitted, batch_size: int, model_name: str, model_version: str | None) -> Reply:
    """The answer of a request refused whole (before any model request of it ran)."""
    if req.incoming.protocol in OWN_ANSWER:
        return rest(Outcome(error=req.error), batch_size)
    return kserve_reply(req, [], batch_size, model_name, model_version)
