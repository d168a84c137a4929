"""The loops that run a model over a server's batches, and the admission they share.

* `StaticLoop`: one call answers its whole batch. Requests are admitted (parsed, budgeted),
  grouped by their batched fields, each group runs as one forward pass, and every request gets
  exactly one answer, in order; streaming requests get NDJSON events while their group runs.
* `StepLoop`: step-level (continuous) batching. Requests stay in flight across calls, followed by
  the server's request id; each call runs one time slice of steps of every request in flight and
  answers those that finished. The state of the requests in flight is the loop's own.

Both record each generation request's progress by its id and stop it after the step in which a
cancel for it arrives (handlers/core/jobs.py, docs/jobs.md).

Every answer is written by handlers/core/answers.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from handlers.core import answers, kserve
from handlers.core.answers import Reply
from handlers.core.batch import (
    GRPC,
    JSON_TYPE,
    KSERVE_V2,
    NDJSON_TYPE,
    OWN_ANSWER,
    PNG_TYPE,
    REST,
    Admitted,
    Group,
    GroupCancelled,
    Incoming,
    Outcome,
    Pending,
)
from handlers.core.bodies import json_body
from handlers.core.budget import charge, streaming
from handlers.core.errors import RequestError, internal_error
from handlers.core.jobs import Jobs, cancelled_error
from handlers.core.model import ServedModel
from handlers.core.streaming import BatchStreams, Channel, no_progress, request_id_of

logger = logging.getLogger(__name__)

BUSY = "server busy: this batch is at its time budget; retry"


def not_streamed(protocol: str) -> RequestError:
    """The 400 of a `stream` request on a protocol that answers once per request."""
    if protocol == GRPC:
        return RequestError("stream", "'stream' is not available over gRPC: TorchServe 0.12 cannot tell a "
                            "unary call from a streaming one, and a unary call that gets more than one "
                            "message breaks its worker; use POST /predictions/<model> for NDJSON progress "
                            "events (docs/protocols.md)")
    return RequestError("stream", "'stream' is not available over the KServe protocol; use "
                                  "/predictions/<model> for NDJSON progress events")


@dataclass
class Server:
    """What the loops need to know of the server: names for KServe v2 answers, the most model
    requests one KServe v1 request may carry (its batch size), and the request ids in flight on
    this server instance (handlers/core/jobs.py; None: ids are not tracked)."""

    model_name: str
    model_version: str | None = None
    max_instances: int | None = None
    jobs: Jobs | None = None

    def release(self, flat: list) -> None:
        """Ends the claims of the admitted generation requests among `flat` (admit() claimed them)."""
        if self.jobs is not None:
            for p in flat:
                if isinstance(p, Pending) and (request_id := request_id_of(p)):
                    self.jobs.release(request_id)


def admit(model: ServedModel, inc: Incoming, flat: list, server: Server) -> Admitted:
    """One request -> its model requests appended to `flat` (a Pending, or the RequestError that
    refused it), each parsed, checked against the time budget, with what its request asked for."""
    req = Admitted(inc)
    try:
        if inc.protocol in OWN_ANSWER:
            bodies = [("", inc.body)]
        elif inc.protocol == KSERVE_V2:
            if inc.binary_tensors:
                raise RequestError("body", kserve.BINARY_REFUSED)
            fields, meta = kserve.unwrap_v2(json_body(inc.body))
            req.v2_id, req.wanted_outputs = meta["id"], meta.get("outputs")
            bodies = [("", fields)]
        else:
            instances = kserve.unwrap_v1(json_body(inc.body), kserve.image_field(model.request), server.max_instances)
            bodies = [(f"instances[{i}]", b) for i, b in enumerate(instances)]
    except RequestError as err:
        req.error = err
        return req
    for label, body in bodies:
        try:
            if inc.protocol not in OWN_ANSWER and not isinstance(body, dict):
                raise RequestError(None, f"must be a JSON object of the model's fields, got {type(body).__name__}")
            params = model.parse(body)
            if inc.protocol != REST and streaming(params):  # the other protocols answer once per request
                raise not_streamed(inc.protocol)
            model.budget.check(params)
            png = inc.protocol == REST and inc.wants_png and model.png_ok(params)
            if server.jobs is not None and getattr(params, "request_id", None):
                server.jobs.claim(params.request_id)  # the last check: a refused request claims nothing
                server.jobs.report(params.request_id, 0, model.steps_total(params), 0.0)
            item = Pending(len(flat), params, png=png, explain=inc.explain, origin=inc.idx, admitted=time.monotonic())
        except RequestError as err:
            item = err
        req.members.append((label, len(flat)))
        flat.append(item)
    return req


def answer(req: Admitted, outcomes: list[Outcome], batch_size: int, server: Server) -> Reply:
    """A request's answer in its protocol, from the outcomes of its model requests."""
    if req.error is not None:
        return answers.refused(req, batch_size, server.model_name, server.model_version)
    if req.incoming.protocol in OWN_ANSWER:
        ((_, i),) = req.members
        return answers.rest(outcomes[i], batch_size)
    return answers.kserve_reply(req, outcomes, batch_size, server.model_name, server.model_version)


class Watch:
    """The progress callback of every group: after each step it notes in `group.stopped` the
    requests whose `deadline_s` has passed, and on a server that tracks request ids records each
    request's progress and notes in `group.cancelled` the ones cancelled meanwhile, stopping the
    group (GroupCancelled) once all of it is cancelled; then it passes on to `then` (the streams)."""

    def __init__(self, model: ServedModel, jobs: Jobs | None, then):
        self.model, self.jobs, self.then = model, jobs, then
        self.totals: dict[int, int] = {}

    def total(self, p: Pending) -> int:
        if p.idx not in self.totals:
            self.totals[p.idx] = self.model.steps_total(p.params)
        return self.totals[p.idx]

    def __call__(self, group: Group, step: int, group_started: float, previews=None) -> None:
        now = time.monotonic()
        for p in group.requests:
            if p.idx in group.cancelled or p.idx in group.stopped:
                continue
            rid = request_id_of(p)
            if self.jobs is not None and rid is not None:
                if self.jobs.cancel_requested(rid):
                    group.cancelled[p.idx] = step
                    continue
                self.jobs.report(rid, step, self.total(p), now - group_started)
            if p.past_deadline(now) and step < self.total(p):
                group.stopped[p.idx] = step
        if group.cancelled and len(group.cancelled) == len(group.requests):
            raise GroupCancelled
        self.then(group, step, group_started, previews)


def run_group(model: ServedModel, members: list[Pending], progress, jobs: Jobs | None = None) -> list[Outcome]:
    """One forward pass for requests that share their batched fields; one outcome per request.
    A failing group fails its own requests only; a cancelled request is answered 499 (one
    cancelled before its group started does not join it)."""
    gone = {p.idx for p in members if jobs is not None and (rid := request_id_of(p)) and jobs.cancel_requested(rid)}
    group = Group(shared=members[0].params.shared(), requests=[p for p in members if p.idx not in gone])
    group.cancelled.update(dict.fromkeys(gone, 0))
    progress = Watch(model, jobs, progress)
    try:
        results = []
        if group.requests:
            started = time.perf_counter()
            try:
                results = model.run_group(group, progress)
            except GroupCancelled:
                pass
            if not group.cancelled and not group.stopped:
                model.budget.observe(time.perf_counter() - started, sum(p.params.cost() for p in members))
        outcomes, start = [], 0
        for p in members:
            n = p.params.images_requested
            if p.idx in group.cancelled:
                total = model.steps_total(p.params)
                outcomes.append(Outcome(error=cancelled_error(request_id_of(p), group.cancelled[p.idx], total)))
            else:
                outcomes.append(stopped_at(model.respond(p, results[start : start + n]), group.stopped.get(p.idx)))
            if p.idx not in gone:
                start += n
    except RequestError as err:
        outcomes = [Outcome(error=err)] * len(members)
    except Exception as exc:  # noqa: BLE001 - one failing group must not fail the batch
        logger.exception("group of %d requests failed", len(members))
        outcomes = [Outcome(error=internal_error(exc))] * len(members)
    if jobs is not None:
        for p, outcome in zip(members, outcomes):
            record_end(jobs, p, outcome)
    return outcomes


def stopped_at(outcome: Outcome, step: int | None) -> Outcome:
    """A request its deadline stopped says after which step: `stopped_at_step` in its JSON (and in
    its stream's result event), `X-Stopped-At-Step` on a PNG answer."""
    if step is not None and outcome.error is None:
        if isinstance(outcome.response, dict):
            outcome.response["stopped_at_step"] = step
        else:
            outcome.headers["X-Stopped-At-Step"] = str(step)
    return outcome


def record_end(jobs: Jobs, pending: Pending, outcome: Outcome) -> None:
    """A generation request's last state for status queries: finished, cancelled or failed."""
    rid = request_id_of(pending)
    if rid is None:
        return
    err = outcome.error
    if err is None:
        stopped = outcome.response.get("stopped_at_step") if isinstance(outcome.response, dict) else None
        jobs.end(rid, "finished", **({} if stopped is None else {"stopped_at_step": stopped}))
    elif err.extra.get("cancelled"):
        jobs.end(rid, "cancelled", stopped_at_step=err.extra["stopped_at_step"], total=err.extra.get("total"))
    else:
        jobs.end(rid, "failed", error=err.message, status=err.status)


class StaticLoop:
    """One call answers its whole batch (see the module docstring)."""

    def __init__(self, model: ServedModel, server: Server):
        self.model = model
        self.server = server

    def run(self, batch: list[Incoming], channel: Channel | None) -> list[Reply]:
        """`channel`: where streaming requests' events go (None: nobody to stream to, e.g. an
        in-process caller; they are answered with their final message only)."""
        flat: list = []
        try:
            admitted = [admit(self.model, inc, flat, self.server) for inc in batch]
            return self.answer_all(batch, admitted, flat, channel)
        finally:
            self.server.release(flat)

    def answer_all(self, batch: list[Incoming], admitted: list[Admitted], flat: list,
                   channel: Channel | None) -> list[Reply]:
        flat = list(flat)  # refusals below replace items here only: run() releases the claims of all
        spent = 0.0
        for i, item in enumerate(flat):
            if isinstance(item, Pending):
                spent += charge(item.params)
                if spent > self.model.budget.units:
                    flat[i] = RequestError(None, BUSY, 503)
                    if self.server.jobs is not None:
                        record_end(self.server.jobs, item, Outcome(error=flat[i]))
        outcomes: list[Any] = [Outcome(error=p) if isinstance(p, RequestError) else None for p in flat]
        pendings = [p for p in flat if isinstance(p, Pending)]
        streamed = [p for p in pendings if p.streaming]
        streams = BatchStreams(channel, streamed, len(batch), self.model.steps_total) if streamed and channel else None
        groups: dict[tuple, list[Pending]] = {}
        for p in pendings:
            groups.setdefault(p.params.batch_key(), []).append(p)
        progress = streams.progress if streams else no_progress
        for members in groups.values():
            for p, outcome in zip(members, run_group(self.model, members, progress, self.server.jobs)):
                outcomes[p.idx] = outcome
        replies = []
        for req in admitted:
            if req.error is None and streams is not None and req.members[0][1] in streams:
                i = req.members[0][1]
                replies.append(answers.later(answers.stream_end(outcomes[i], request_id=request_id_of(flat[i]))))
            else:
                replies.append(answer(req, outcomes, len(batch), self.server))
        return replies


@dataclass
class InFlight:
    """One request of the step-level loop across calls: its model requests, their flights (the
    model's sampling state) while they run, and their outcomes once ended."""

    req: Admitted
    pendings: list
    flights: dict[int, Any] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.req.error is not None or len(self.outcomes) == len(self.pendings)

    @property
    def streamed(self) -> bool:
        """A REST request with `stream`: its events go out as its flight runs."""
        p = self.pendings[0] if self.pendings else None
        return self.req.incoming.protocol == REST and isinstance(p, Pending) and p.streaming

    def content_type(self) -> str:
        p = self.pendings[0]
        if self.req.incoming.protocol in OWN_ANSWER and isinstance(p, Pending):
            return NDJSON_TYPE if p.streaming else PNG_TYPE if p.png else JSON_TYPE
        return JSON_TYPE


class StepLoop:
    """Step-level batching (see the module docstring). The model implements the step hooks:

        start_stepping()              once, when the loop is made
        take_off(pending, watch) -> flight
                                      a request's own sampling state (`.done`, `.events`,
                                      `.cancelled_at`, `.stopped_at`); it calls `watch(step, total)`
                                      (when not None) after each step and ends at once when it
                                      says True; past the request's deadline_s it lands with its
                                      estimate of that step (`stopped_at`)
        run_slice(flights)            steps of these flights for one time slice
        land(flight) -> results       one result per image, as run_group gives them

    `run` returns, per request, its message and whether it ended: None = answered in its first
    call (an ordinary response), False = still running (this message is a chunk), True = its
    last chunk.

    gRPC requests get one message only (TorchServe 0.12 drops a gRPC request after its first
    message under continuous batching), so they run whole in the call they arrive in, on the
    static loop, and the requests in flight wait for them."""

    def __init__(self, model: ServedModel, server: Server):
        if not model.can_step:
            raise ValueError(f"{type(model).__name__} has no step-level loop; remove continuousBatching from its config")
        model.start_stepping()
        self.model = model
        self.server = server
        self.whole = StaticLoop(model, server)
        self.in_flight: dict[str, InFlight] = {}

    def run(self, batch: list[Incoming]) -> list[tuple[Reply, bool | None]]:
        once = [inc for inc in batch if inc.protocol == GRPC]
        answered = dict(zip((inc.idx for inc in once), self.whole.run(once, None))) if once else {}
        stepped = [inc for inc in batch if inc.protocol != GRPC]
        messages = dict(zip((inc.idx for inc in stepped), self.step(stepped, len(batch))))
        return [(answered[inc.idx], None) if inc.idx in answered else messages[inc.idx] for inc in batch]

    def step(self, batch: list[Incoming], batch_size: int) -> list[tuple[Reply, bool | None]]:
        ids = [inc.request_id for inc in batch]
        for gone in set(self.in_flight) - set(ids):  # the server dropped it (client closed)
            t = self.in_flight.pop(gone)
            if self.server.jobs is not None:
                for i, f in t.flights.items():
                    record_end(self.server.jobs, t.pendings[i], Outcome(error=cancelled_error(
                        request_id_of(t.pendings[i]), f.k, self.model.steps_total(t.pendings[i].params))))
            self.server.release(t.pendings)
        new = set()
        for inc in batch:
            if inc.request_id not in self.in_flight:
                new.add(inc.idx)
                self.in_flight[inc.request_id] = self.take_off(inc)
        active = [f for rid in ids for f in self.in_flight[rid].flights.values()]
        try:
            if active:
                self.model.run_slice(active)
        except Exception as exc:  # noqa: BLE001 - reported to every request of this slice
            logger.exception("step of %d requests failed", len(active))
            for rid in ids:
                t = self.in_flight[rid]
                t.outcomes.update({i: Outcome(error=internal_error(exc)) for i in t.flights})
                t.flights.clear()
        return [self.message(self.in_flight[inc.request_id], inc, first=inc.idx in new, batch_size=batch_size)
                for inc in batch]

    def take_off(self, inc: Incoming) -> InFlight:
        flat: list = []
        t = InFlight(admit(self.model, inc, flat, self.server), flat)
        for i, item in enumerate(flat):
            if isinstance(item, RequestError):
                t.outcomes[i] = Outcome(error=item)
                continue
            try:
                t.flights[i] = self.model.take_off(item, self.watch(item))
            except Exception as exc:  # noqa: BLE001 - one failing request must not fail the others
                logger.exception("admitting request %s failed", inc.request_id)
                t.outcomes[i] = Outcome(error=internal_error(exc))
        return t

    def watch(self, pending: Pending):
        """`watch(step, total) -> cancelled?` for a request's flight: records its progress by id
        and reads whether a cancel for it stands; None on a server without ids."""
        jobs, rid = self.server.jobs, request_id_of(pending)
        if jobs is None or rid is None:
            return None
        started = time.monotonic()

        def watch(step: int, total: int) -> bool:
            if jobs.cancel_requested(rid):
                return True
            jobs.report(rid, step, total, time.monotonic() - started)
            return False

        return watch

    def message(self, t: InFlight, inc: Incoming, first: bool, batch_size: int) -> tuple[Reply, bool | None]:
        events: list[dict] = []
        if t.streamed and 0 in t.flights:
            events, t.flights[0].events = t.flights[0].events, []
        for i, f in list(t.flights.items()):
            if f.done:
                del t.flights[i]
                if f.cancelled_at is not None:
                    params = t.pendings[i].params
                    t.outcomes[i] = Outcome(error=cancelled_error(params.request_id, f.cancelled_at,
                                                                  self.model.steps_total(params)))
                    continue
                try:
                    t.outcomes[i] = stopped_at(self.model.respond(t.pendings[i], self.model.land(f)), f.stopped_at)
                except Exception as exc:  # noqa: BLE001
                    logger.exception("answering request %s failed", inc.request_id)
                    t.outcomes[i] = Outcome(error=internal_error(exc))
        if not t.ended:
            body = answers.ndjson(events, request_id_of(t.pendings[0])) if events else b""
            return (answers.running(t.content_type(), batch_size, body) if first else answers.later(body)), False
        self.server.release(self.in_flight.pop(inc.request_id).pendings)
        outcomes = [t.outcomes[i] for i in range(len(t.pendings))]
        if self.server.jobs is not None:
            for p, outcome in zip(t.pendings, outcomes):
                if isinstance(p, Pending):
                    record_end(self.server.jobs, p, outcome)
        if t.streamed:
            body = answers.stream_end(outcomes[0], events if outcomes[0].error is None else [],
                                      request_id_of(t.pendings[0]))
            return (answers.running(NDJSON_TYPE, batch_size, body) if first else answers.later(body)), \
                None if first else True
        reply = answer(t.req, outcomes, batch_size, self.server)
        # After its first message a request's status is fixed (200): a later error goes in its body.
        return (reply, None) if first else (answers.later(reply.body), True)
