"""Request mixes for load and fault tests: one small, valid request per model, helpers to read
worker processes (pids, RSS) of a running TorchServe, and what two answers are compared on."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import psutil
import requests

from harness.inprocess import png_bytes
from weights import digits


def valid_payloads() -> dict:
    """A cheap valid request per model (small sizes and few steps for the diffusion models)."""
    images, _ = digits.load_arrays()
    return {
        "cam": png_bytes(digits.to_pil(images[0], 64)),
        "ddpm": {"num_images": 1, "steps": 5, "seed": 0},
        "sd15": {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "seed": 0},
    }


def without_ids(answer) -> object:
    """A JSON answer (dict, str or bytes; NDJSON: a list of events) with every `request_id` left
    out: each request has its own, so two requests' answers are compared on what they made."""
    if isinstance(answer, (bytes, bytearray)):
        answer = answer.decode("utf-8")
    if isinstance(answer, str):
        lines = [line for line in answer.splitlines() if line.strip()]
        answer = [json.loads(line) for line in lines] if len(lines) > 1 else json.loads(answer)

    def strip(value):
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "request_id"}
        return value

    return strip(answer)


def worker_pids(client, model: str) -> list[int]:
    return sorted(w["pid"] for d in client.describe(model) for w in d["workers"])


def peak_rss(pid: int) -> int:
    """VmHWM: the largest resident set the process has had, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def kill_worker_under_load(ts, model: str, payload, threads: int = 4, timeout: float = 120.0,
                           after: int = 20, client_timeout: float = 60.0) -> dict:
    """SIGKILLs one worker of `model` while `threads` clients send requests; measures how long
    until a replacement worker is READY and what happened to the requests around the kill.

    Requests are classified by when they were SENT: one in flight at the kill may take seconds
    to get its error answer (TorchServe fails the dead worker's batch once it sees the death), so
    "answered after recovery" would wrongly blame it on the recovered server. Traffic goes on
    until `after` requests sent after recovery have been answered.

    TorchServe 0.12 loses the requests a worker thread is gathering into a batch (waiting up to
    maxBatchDelay) when its process dies: BatchAggregator.getRequest() is interrupted before the
    batch exists, so WorkerThread has no request to send "Worker died." (507) for. Those get no
    answer at all; only the client's timeout ends them. They are counted as `lost_around_kill`."""
    client = ts.make_client(timeout=client_timeout, retries=0)
    victim = worker_pids(client, model)[0]
    calls: list[tuple[float, float, int | str]] = []  # (sent, answered, status or exception name)
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = client.predict_raw(model, payload).status_code
            except requests.RequestException as exc:  # an error answer, not a hang
                status = type(exc).__name__
            calls.append((sent, time.monotonic(), status))

    workers = [threading.Thread(target=traffic) for _ in range(threads)]
    for t in workers:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    recovered = wait_replaced(client, model, victim, timeout)
    recovered_at = time.monotonic()  # without recovery: the end of the wait
    deadline = recovered_at + timeout
    while recovered and time.monotonic() < deadline and sum(c[0] > recovered_at for c in list(calls)) < after:
        time.sleep(0.2)
    stop.set()
    for t in workers:
        t.join(timeout=90)
    around = [c for c in calls if c[0] < recovered_at and c[1] > killed_at]
    post = [c for c in calls if c[0] > recovered_at]
    return {
        "recovered": recovered,
        "recovery_s": round(recovered_at - killed_at, 1),
        "requests_around_kill": len(around),
        "failed_around_kill": sum(c[2] != 200 for c in around),
        "error_answers_around_kill": sum(isinstance(c[2], int) and c[2] != 200 for c in around),
        "lost_around_kill": sum(not isinstance(c[2], int) and c[1] - c[0] >= client_timeout - 1 for c in around),
        "slowest_around_kill_s": round(max((c[1] - c[0] for c in around), default=0.0), 1),
        "requests_after_recovery": len(post),
        "failed_after_recovery": sum(c[2] != 200 for c in post),
        "failures": dict(Counter(str(c[2]) for c in calls if c[2] != 200)),
        "hung": sum(t.is_alive() for t in workers),
        "victim_gone": victim not in worker_pids(client, model),
    }


def wait_replaced(client, model: str, victim: int, timeout: float) -> bool:
    """Waits until the killed worker `victim` is gone from `model`'s workers and all of them are
    READY (right after a kill, describe may still list the dead worker as READY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = client.describe(model)
        pids = [w["pid"] for d in desc for w in d["workers"]]
        if victim not in pids and pids and all(w["status"] == "READY" for d in desc for w in d["workers"]):
            return True
        time.sleep(0.5)
    return False


def assert_bad_input_refused(ts, model: str, payload, field: str) -> None:
    """Through the server: HTTP 400 naming `field`, and the same worker still serving."""
    pids = worker_pids(ts.client, model)
    resp = ts.client.predict_raw(model, payload)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == field and isinstance(body["error"], str) and body["error"]
    assert worker_pids(ts.client, model) == pids
