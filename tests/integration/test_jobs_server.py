"""Cancel and status by request id (docs/jobs.md) in a real TorchServe: the archives archive.sh
builds (ddpm with static batching, ddpm on its step-level target as `ddpm_step`, sd15, and the
`jobs` archive beside them), driven over REST with the project's client as a user would."""
from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clients.api import ServerError
from harness import REPO
from harness.torchserve import VENV_BIN, TorchServeInstance, run_archive_sh

VENV_PYTHON = VENV_BIN / "python"

# Seconds on the demo model: time to cancel it. Streamed, so that it is admitted whatever speed a busy
# machine gave the worker's time budget (a stream's limit is per step).
LONG_DDPM = {"steps": 1000, "num_images": 8, "seed": 3, "stream": True, "preview_every": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("jobs-store")
    for args in (("ddpm", "sd15"), ("--target", "cpu-step", "--name", "ddpm_step", "ddpm")):
        run = run_archive_sh("--store", str(store), *args)
        assert run.returncode == 0, run.stderr
    archives = ["ddpm.mar", "ddpm_step.mar", "sd15", "jobs.mar"]
    with TorchServeInstance(archives=archives, source_store=store) as ts:
        ts.client.wait_ready(["ddpm", "ddpm_step", "sd15", "jobs"], timeout=300)
        yield ts


class Sent:
    """One request sent on its own thread; `.resp` once answered."""

    def __init__(self, ts, model: str, body: dict):
        self.resp = None
        self.thread = threading.Thread(target=lambda: setattr(self, "resp", ts.client.predict_raw(model, body)))
        self.thread.start()

    def result(self):
        self.thread.join(timeout=600)
        assert self.resp is not None, "no answer"
        return self.resp


def wait_running(ts, model: str, request_id: str, past_step: int = 2, sent: Sent | None = None) -> dict:
    """Polls status until the request is running beyond `past_step` (failing at once when `sent`,
    the request, was answered meanwhile)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert sent is None or sent.resp is None, f"answered before it ran: {sent.resp.status_code} {sent.resp.text[:300]}"
        try:
            record = ts.client.job_status(model, request_id)
        except ServerError as err:
            assert err.status == 404, err
        else:
            if record["state"] == "running" and record["step"] > past_step:
                return record
            assert record["state"] == "running", record
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never ran past step {past_step}")


def last_event(resp) -> dict:
    return json.loads(resp.text.strip().splitlines()[-1])


def worker_pids(ts, model: str) -> set[int]:
    return {w["pid"] for w in ts.client.describe(model)[0]["workers"]}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.parametrize("model", ["ddpm", "ddpm_step"])
def test_cancel_stops_a_running_ddpm_request_and_the_worker_survives(server, model):
    pids = worker_pids(server, model)
    sent = Sent(server, model, {**LONG_DDPM, "request_id": f"{model}-cancel-me"})
    running = wait_running(server, model, f"{model}-cancel-me", sent=sent)
    assert running["total"] == 1000 and running["pid"] in pids
    answer = server.client.cancel(model, f"{model}-cancel-me")
    assert answer["state"] == "cancelling" and answer["cancelled"] and answer["worker_pid"] == running["pid"]
    resp = sent.result()
    assert resp.status_code == 200, resp.text[:300]  # a stream's status went out with its first event
    body = last_event(resp)
    assert body["event"] == "cancelled" and body["status"] == 499
    assert body["field"] == "request_id" and body["cancelled"] is True and body["request_id"] == f"{model}-cancel-me"
    assert running["step"] <= body["stopped_at_step"] < 1000 and body["total"] == 1000
    record = server.client.job_status(model, f"{model}-cancel-me")
    assert record["state"] == "cancelled" and record["stopped_at_step"] == body["stopped_at_step"]
    again = server.client.cancel(model, f"{model}-cancel-me")
    assert again["state"] == "cancelled" and again["cancelled"] is False
    assert worker_pids(server, model) == pids
    assert server.client.predict_raw(model, {"steps": 5}).status_code == 200


def test_the_other_requests_of_a_cancelled_ones_batch_are_untouched(server):
    """One ddpm worker, two requests in one batch and one group: the cancelled one's rows leave
    the loop, the other's image is byte for byte what it is without the cancel."""
    server.client.scale("ddpm", 1, 1)
    try:
        mate = {"steps": 1000, "num_images": 1, "seed": 11, "metadata": False}
        alone = server.client.predict("ddpm", {**mate, "request_id": "mate-alone-1"})
        victim = Sent(server, "ddpm", {**LONG_DDPM, "request_id": "victim-0001"})
        other = Sent(server, "ddpm", {**mate, "request_id": "mate-batched"})
        wait_running(server, "ddpm", "victim-0001", past_step=50, sent=victim)
        assert server.client.job_status("ddpm", "mate-batched")["state"] == "running"
        server.client.cancel("ddpm", "victim-0001")
        cancelled, kept = victim.result(), other.result()
        assert last_event(cancelled)["status"] == 499 and kept.status_code == 200, (cancelled.text[-200:], kept.text[:200])
        assert cancelled.headers["X-Batch-Size"] == kept.headers["X-Batch-Size"] == "2"
        (got,), (want,) = kept.json()["images"], alone["images"]
        assert np.abs(pixels(got).astype(int) - pixels(want).astype(int)).max() <= 1  # the project's batching rule
    finally:
        server.client.scale("ddpm", 2, 2)


def test_a_cancel_before_the_request_arrives_refuses_it(server):
    answer = server.client.cancel("sd15", "not-yet-sent-1")
    assert answer["state"] == "not running" and answer["cancelled"] and "will be refused" in answer["message"]
    assert server.client.job_status("sd15", "not-yet-sent-1")["cancel_requested"] is True
    resp = server.client.predict_raw("sd15", {"prompt": "a 3", "steps": 3, "request_id": "not-yet-sent-1"})
    assert resp.status_code == 499 and resp.json()["stopped_at_step"] == 0, resp.text[:300]
    assert server.client.predict_raw("sd15", {"prompt": "a 3", "steps": 3}).status_code == 200


def test_cancelling_a_streamed_sd15_request_ends_its_stream_with_a_cancelled_event(server):
    events, err = [], []

    def consume():
        try:
            for event in server.client.stream("sd15", {"prompt": "a red 3", "steps": 60, "width": 192, "height": 192,
                                                       "request_id": "sd15-stream-1"}):
                events.append(event)
        except ServerError as exc:
            err.append(exc)

    th = threading.Thread(target=consume)
    th.start()
    wait_running(server, "sd15", "sd15-stream-1")
    server.client.cancel("sd15", "sd15-stream-1")
    th.join(timeout=300)
    (exc,) = err
    assert exc.status == 499 and exc.body["event"] == "cancelled", exc.body
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert events[0]["total"] == exc.body["total"] and exc.body["stopped_at_step"] < exc.body["total"]
    assert steps[-1] <= exc.body["stopped_at_step"] and exc.body["request_id"] == "sd15-stream-1"


def test_status_of_a_finished_request_and_of_unknown_ones(server):
    body = server.client.predict("ddpm", {"steps": 5, "request_id": "finished-01"})
    assert body["request_id"] == "finished-01"
    assert server.client.job_status("ddpm", "finished-01")["state"] == "finished"
    answer = server.client.cancel("ddpm", "finished-01")
    assert answer["state"] == "finished" and answer["cancelled"] is False
    assert server.client.predict_raw("ddpm", {"steps": 5, "request_id": "finished-01"}).status_code == 200
    with pytest.raises(ServerError) as unknown:
        server.client.job_status("ddpm", "never-sent-1")
    assert unknown.value.status == 404 and unknown.value.body["field"] == "request_id"


@pytest.mark.parametrize("payload, field, status", [
    ({"action": "stop", "model": "ddpm", "request_id": "abcdefgh"}, "action", 400),
    ({"action": "cancel", "model": "ddpm", "request_id": "no"}, "request_id", 400),
    ({"action": "cancel", "model": "ddpm"}, "request_id", 400),
    ({"action": "status", "model": "cam", "request_id": "abcdefgh"}, "model", 404),
    ({"action": "status", "model": "ddpm", "request_id": "abcdefgh", "x": 1}, "x", 400),
])
def test_bad_jobs_requests_name_their_field(server, payload, field, status):
    resp = server.client.predict_raw("jobs", payload)
    assert resp.status_code == status and resp.json()["field"] == field, resp.text


@pytest.mark.parametrize("tool, model, args", [
    ("generate", "sd15", ["a red handwritten 7", "--steps", "100", "--width", "512", "--height", "512"]),
    ("sample", "ddpm", ["-n", "16", "--steps", "1000"]),
])
def test_ctrl_c_in_a_client_tool_cancels_its_request(server, tool, model, args):
    """`python -m clients.<tool>` interrupted by SIGINT mid-stream: the server cancels the request
    (its status says so) and the tool exits 130 saying what became of it."""
    command = [str(VENV_PYTHON), "-m", f"clients.{tool}", *args, "--out", str(server.dir / f"{tool}-out"),
               "--inference-url", server.url("inference"), "--management-url", server.url("management"),
               "--key-file", str(server.dir / "key_file.json")]
    status_dir = server.tmp / "torchserve-jobs" / model / "status"
    before = {p.name for p in status_dir.glob("*.json")}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    running = []
    while not running and time.monotonic() < deadline:
        time.sleep(0.2)
        for path in status_dir.glob("*.json"):  # the tool's own id is random: find its request by its record
            record = json.loads(path.read_text()) if path.name not in before else {}
            if record.get("state") == "running" and record["step"] > 2:
                running.append(record["request_id"])
    assert running, "the tool's request never ran"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    (rid,) = running
    assert f"request {rid}: cancelling" in err, err
    deadline = time.monotonic() + 120
    while server.client.job_status(model, rid)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    record = server.client.job_status(model, rid)
    assert record["state"] == "cancelled" and record["stopped_at_step"] < record["total"], record


def test_the_jobs_archive_over_grpc(server):
    """TorchServe's own gRPC Predictions (the vendored protos, grpcio) reaches the jobs archive too."""
    from clients.grpc_api import GrpcRequestError

    grpc = server.make_grpc_client()
    server.client.predict("ddpm", {"steps": 3, "request_id": "grpc-finished"})
    record = grpc.predict("jobs", {"action": "status", "model": "ddpm", "request_id": "grpc-finished"})
    assert record["state"] == "finished" and record["request_id"] == "grpc-finished"
    with pytest.raises(GrpcRequestError) as bad:
        grpc.predict("jobs", {"action": "status", "model": "ddpm", "request_id": "?"})
    assert bad.value.body["field"] == "request_id"


def test_a_deadline_ends_a_stream_with_the_estimate(server):
    """`deadline_s` over the wire: the stream's result event says where it stopped, and so does
    the PNG answer's header."""
    events = list(server.client.stream("sd15", {"prompt": "a red 3", "steps": 60, "width": 192, "height": 192,
                                                "deadline_s": 1.0, "seed": 4}))
    stopped = events[-1]["response"]["stopped_at_step"]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert 1 <= stopped < events[0]["total"] and steps[-1] == stopped
    resp = server.client.predict_raw("ddpm", {"steps": 500, "num_images": 2, "deadline_s": 0.1},
                                     accept="image/png")
    assert resp.status_code == 200 and "X-Stopped-At-Step" not in resp.headers  # 2 images: JSON
    resp = server.client.predict_raw("ddpm", {"steps": 500, "deadline_s": 0.1}, accept="image/png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert 1 <= int(resp.headers["X-Stopped-At-Step"]) < 500
