"""Status, cancel and deadlines in-process (handlers/core/jobs.py, handlers/jobs/control.py):
what a worker records, what a cancel does to a request and to the others of its batch, and what
the `jobs` archive answers. A real TorchServe: tests/integration/test_jobs_server.py."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from handlers.core.jobs import Jobs
from handlers.jobs.control import JobControl, JobsRequest
from harness.context import run_batch
from harness.continuous import ContinuousWorker
from harness.inprocess import demo_weights, load_handler, pixels, unpack
from tests.support.ids import fresh_id, jobs_of

BODY = {"steps": 2, "seed": 4}



def test_a_finished_request_is_recorded(ddpm_handler):
    handler, ctx = ddpm_handler
    rid = fresh_id()
    run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}])
    record = jobs_of(handler).status(rid)
    assert record["state"] == "finished" and record["keep_until"] > time.time()


def test_a_cancel_before_arrival_refuses_only_that_request(ddpm_handler):
    handler, ctx = ddpm_handler
    rid, other = fresh_id(), fresh_id()
    jobs_of(handler).request_cancel(rid, 60)
    outs = run_batch(handler, ctx, [{"body": {**BODY, "request_id": rid}}, {"body": {**BODY, "request_id": other}}])
    assert ctx.status(0) == 499 and ctx.status(1) == 200
    body = json.loads(outs[0])
    assert body["cancelled"] is True and body["stopped_at_step"] == 0 and body["field"] == "request_id"


def test_an_expired_cancel_is_ignored_and_removed(tmp_path):
    jobs = Jobs("m", str(tmp_path))
    jobs.request_cancel("expired-id", -1)
    assert not jobs.cancel_requested("expired-id")
    assert not (jobs.cancels / "expired-id").exists()
    jobs.request_cancel("standing-id", 60)
    assert jobs.cancel_requested("standing-id")


def test_ended_records_expire_and_a_dead_workers_running_record_reads_failed(tmp_path):
    jobs = Jobs("m", str(tmp_path), status_keep_s=-1)
    jobs.end("old-request", "finished")
    assert jobs.status("old-request") is None
    jobs._pruned = 0.0
    jobs.prune()
    assert not (jobs.status_dir / "old-request.json").exists()
    jobs.report("lost-request", 3, 10, 1.0)  # running, but no worker holds the id
    assert jobs.status("lost-request")["state"] == "failed"


def cancel_when_running(jobs: Jobs, rid: str, past_step: int) -> threading.Thread:
    """A thread that cancels `rid` once its status says it is past `past_step`."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = jobs.status(rid)
            if record and record["state"] == "running" and record["step"] > past_step:
                jobs.request_cancel(rid, 60)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


@pytest.mark.parametrize("model", ["ddpm", "sd15"])
def test_a_cancelled_request_leaves_its_group_mate_untouched(model, ddpm_handler, sd15_handler):
    """Two requests in one group, one cancelled mid-run: it is answered 499 after a step before the
    last, the other gets its image alone, within the project's batching rule (ddpm: the cancelled
    rows leave the loop; sd15: the group runs on)."""
    handler, ctx = ddpm_handler if model == "ddpm" else sd15_handler
    base = {"steps": 200, "seed": 9} if model == "ddpm" else {"prompt": "a 3", "steps": 100, "width": 64, "height": 64}
    victim, mate = fresh_id(), fresh_id()
    (alone,) = run_batch(handler, ctx, [{"body": {**base, "seed": 2, "metadata": False}}])
    watcher = cancel_when_running(jobs_of(handler), victim, past_step=3)
    outs = run_batch(handler, ctx, [{"body": {**base, "request_id": victim}},
                                    {"body": {**base, "seed": 2, "metadata": False, "request_id": mate}}])
    watcher.join()
    assert ctx.status(0) == 499 and ctx.status(1) == 200, outs[0][:300]
    stopped = json.loads(outs[0])
    assert 3 < stopped["stopped_at_step"] < stopped["total"]
    (got,), (want,) = json.loads(outs[1])["images"], json.loads(alone)["images"]
    assert np.abs(pixels(got).astype(int) - pixels(want).astype(int)).max() <= 1
    assert jobs_of(handler).status(victim)["state"] == "cancelled"
    assert jobs_of(handler).status(mate)["state"] == "finished"


def test_the_control_answers(tmp_path):
    jobs = Jobs("ddpm", str(tmp_path), status_keep_s=60)
    control = JobControl(cancel_wait_s=30, root=str(tmp_path))
    assert control.tracked() == ["ddpm"]

    def ask(action: str, rid: str) -> dict:
        return control.answer(JobsRequest.parse({"action": action, "model": "ddpm", "request_id": rid}))

    jobs.claim("running-one")  # this process holds it: alive
    try:
        jobs.report("running-one", 4, 10, 2.0)
        assert ask("status", "running-one")["step"] == 4
        answer = ask("cancel", "running-one")
        assert answer["state"] == "cancelling" and answer["worker_pid"] > 0
        assert jobs.cancel_requested("running-one")
    finally:
        jobs.release("running-one")
    jobs.end("done-one", "finished")
    assert ask("cancel", "done-one")["cancelled"] is False and not jobs.cancel_requested("done-one")
    assert ask("cancel", "future-one")["state"] == "not running"
    assert ask("status", "future-one") == {"request_id": "future-one", "model": "ddpm", "state": "not running",
                                           "cancel_requested": True}
    with pytest.raises(Exception) as unknown:
        ask("status", "never-seen")
    assert unknown.value.status == 404 and unknown.value.field == "request_id"
    with pytest.raises(Exception) as other_model:
        control.answer(JobsRequest.parse({"action": "status", "model": "cam", "request_id": "abcdefgh"}))
    assert other_model.value.status == 404 and other_model.value.field == "model"
    assert np.isfinite(ask("status", "done-one")["updated"])


# deadlines -----------------------------------------------------------------------------------------
def image_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=int)


def test_a_ddpm_deadline_answers_the_estimate_and_leaves_the_batch_mate_untouched(ddpm_handler):
    handler, ctx = ddpm_handler
    mate = {"steps": 300, "seed": 2, "metadata": False}
    (alone,) = run_batch(handler, ctx, [{"body": mate}])
    outs = run_batch(handler, ctx, [{"body": {"steps": 300, "seed": 5, "num_images": 2, "deadline_s": 0.05}},
                                    {"body": mate}])
    assert ctx.status(0) == ctx.status(1) == 200
    early, kept = json.loads(outs[0]), json.loads(outs[1])
    assert 1 <= early["stopped_at_step"] < 300 and "stopped_at_step" not in kept
    assert all(image_array(b).std() > 0 for b in early["images"])  # an estimate, not a blank
    assert kept["images"] == json.loads(alone)["images"]


def test_an_sd15_deadline_stops_the_group_with_the_decoded_estimate(sd15_handler):
    handler, ctx = sd15_handler
    body = {"prompt": "a 3", "steps": 100, "width": 64, "height": 64, "seed": 1, "deadline_s": 0.05}
    outs = run_batch(handler, ctx, [{"body": body}, {"body": {**body, "stream": True, "seed": 2}}])
    assert ctx.status(0) == ctx.status(1) == 200
    early = json.loads(outs[0])
    assert 1 <= early["stopped_at_step"] < 101 and image_array(early["images"][0]).shape == (64, 64, 3)
    # the same deadline, so the same group, stopped together (in-process a stream gets its final answer only)
    assert json.loads(outs[1])["stopped_at_step"] == early["stopped_at_step"]


def test_a_step_level_deadline_lands_the_flight_early(tmp_path):
    from handlers.ddpm.handler import DdpmHandler

    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(tmp_path / "ddpm", "ddpm", demo_weights("ddpm"), "cpu-step"),
                                "cpu-step")
    worker = ContinuousWorker(handler, ctx, batch_size=4)
    worker.submit("early", {"steps": 1000, "seed": 1, "deadline_s": 0.05})
    worker.submit("whole", {"steps": 20, "seed": 2})
    worker.drain()
    early, whole = (json.loads(worker.answers[k].body) for k in ("early", "whole"))
    assert 1 <= early["stopped_at_step"] < 1000 and "stopped_at_step" not in whole


@pytest.mark.parametrize("deadline", [0, -1, 10**6, "5"])
def test_a_bad_deadline_is_refused_by_name(ddpm_handler, deadline):
    handler, ctx = ddpm_handler
    outs = run_batch(handler, ctx, [{"body": {"steps": 2, "deadline_s": deadline}}, {"body": {"steps": 2}}])
    assert ctx.status(0) == 400 and json.loads(outs[0])["field"] == "deadline_s" and ctx.status(1) == 200
