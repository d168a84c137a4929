"""Request ids of the generation models (ddpm, sd15), in-process: an id is generated when the
client gives none (unguessable: 128 random bits), a client's id comes back in the body, and an id
already in flight on this server instance (a file of handlers/core/jobs.py held by a live worker)
is refused with 409 naming `request_id` while the rest of the batch is answered; a finished or
dropped request, and a worker that died, hold no id. Stream events carry the id:
tests/unit/test_target_matrix.py (every target, static and step-level)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from harness.context import run_batch
from harness.continuous import ContinuousWorker
from harness.inprocess import demo_weights, load_handler, unpack
from tests.support.ids import fresh_id, jobs_of

BODY = {"steps": 2, "seed": 4}



def test_generated_ids_are_unguessable_and_returned(ddpm_handler):
    handler, ctx = ddpm_handler
    outs = run_batch(handler, ctx, [{"body": BODY}, {"body": BODY}])
    ids = [json.loads(o)["request_id"] for o in outs]
    assert ids[0] != ids[1]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids), ids


def test_a_clients_id_comes_back(ddpm_handler, sd15_handler):
    for (handler, ctx), body in ((ddpm_handler, BODY),
                                 (sd15_handler, {"prompt": "a red digit", "steps": 2, "width": 64, "height": 64})):
        rid = fresh_id()
        (out,) = run_batch(handler, ctx, [{"body": {**body, "request_id": rid}}])
        assert ctx.status(0) == 200 and json.loads(out)["request_id"] == rid


def test_an_id_in_flight_is_refused_and_the_batch_goes_on(ddpm_handler):
    handler, ctx = ddpm_handler
    rid, other = fresh_id(), fresh_id()
    jobs = jobs_of(handler)
    jobs.claim(rid)  # as another worker of this server instance running it (this process: alive)
    try:
        outs = run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}, {"body": {**BODY, "request_id": other}}])
        assert ctx.status(0) == 409
        assert json.loads(outs[0])["field"] == "request_id" and "already in flight" in json.loads(outs[0])["error"]
        assert ctx.status(1) == 200 and json.loads(outs[1])["request_id"] == other
    finally:
        jobs.release(rid)
    (out,) = run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}])  # released: accepted again
    assert ctx.status(0) == 200 and json.loads(out)["request_id"] == rid
    assert not (jobs.running / rid).exists() and not (jobs.running / other).exists()  # answered: no claim left


def test_the_same_id_twice_in_one_batch(ddpm_handler):
    handler, ctx = ddpm_handler
    rid = fresh_id()
    outs = run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}, {"body": {**BODY, "request_id": rid}}])
    assert (ctx.status(0), ctx.status(1)) == (200, 409)
    assert json.loads(outs[1])["field"] == "request_id"


def test_a_dead_workers_claim_holds_nothing(ddpm_handler):
    handler, ctx = ddpm_handler
    rid = fresh_id()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (jobs_of(handler).running / rid).write_text(dead.stdout.strip())
    assert jobs_of(handler).holder(rid) is None
    (out,) = run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}])
    assert ctx.status(0) == 200 and json.loads(out)["request_id"] == rid


def test_step_level_claims_end_with_the_request(tmp_path):
    """cpu-step: an id is held while its request is in the loop across calls, refused to a second
    request meanwhile, and released when it is answered or dropped by the server."""
    from handlers.ddpm.handler import DdpmHandler

    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(tmp_path / "ddpm", "ddpm", demo_weights("ddpm"), "cpu-step"),
                                "cpu-step")
    handler.model.step_slice_s = 0.0  # one step per call: the request is certainly in flight after the first
    jobs = handler.step_loop.server.jobs
    worker = ContinuousWorker(handler, ctx, batch_size=4)
    rid, gone = fresh_id(), fresh_id()
    worker.submit("long", {"steps": 6, "seed": 1, "request_id": rid})
    worker.submit("leaves", {"steps": 6, "seed": 2, "request_id": gone})
    worker.step()
    assert jobs.holder(rid) is not None and jobs.holder(gone) is not None
    worker.submit("twin", {"steps": 2, "seed": 3, "request_id": rid})
    worker.live.remove("leaves")  # the client closed: the server stops sending it
    worker.drain()
    assert worker.answers["twin"].status == 409 and json.loads(worker.answers["twin"].body)["field"] == "request_id"
    assert worker.answers["long"].status == 200 and json.loads(worker.answers["long"].body)["request_id"] == rid
    assert jobs.holder(rid) is None and not (jobs.running / gone).exists()
