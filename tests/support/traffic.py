"""Request mixes for load and fault tests: one small, valid request per model, and helpers to
read worker processes (pids, RSS) of a running TorchServe."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import requests

from tests.conftest import png_bytes
from weights import digits


def valid_payloads() -> dict:
    """A cheap valid request per model (small sizes and few steps for the diffusion models)."""
    images, _ = digits.load_arrays()
    return {
        "cam": png_bytes(digits.to_pil(images[0], 64)),
        "ddpm": {"num_images": 1, "steps": 5, "seed": 0},
        "sd15": {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "seed": 0},
    }


def worker_pids(client, model: str) -> list[int]:
    return sorted(w["pid"] for d in client.describe(model) for w in d["workers"])


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def kill_worker_under_load(ts, model: str, payload, threads: int = 4, timeout: float = 120.0) -> dict:
    """SIGKILLs one worker of `model` while `threads` clients send requests; measures how long
    until a replacement worker is READY and what happened to the requests around the kill."""
    client = ts.make_client(timeout=60, retries=0)
    victim = worker_pids(client, model)[0]
    results: list = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                results.append(client.predict_raw(model, payload).status_code)
            except requests.RequestException as exc:  # an error answer, not a hang
                results.append(type(exc).__name__)

    workers = [threading.Thread(target=traffic) for _ in range(threads)]
    for t in workers:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    recovered = False
    while time.monotonic() < killed_at + timeout:
        desc = client.describe(model)
        pids = [w["pid"] for d in desc for w in d["workers"]]
        if victim not in pids and pids and all(w["status"] == "READY" for d in desc for w in d["workers"]):
            recovered = True
            break
        time.sleep(0.5)
    recovery_s = time.monotonic() - killed_at
    during = len(results)
    time.sleep(2)
    stop.set()
    for t in workers:
        t.join(timeout=90)
    after = results[during:]
    return {
        "recovered": recovered,
        "recovery_s": round(recovery_s, 1),
        "requests_during_recovery": during,
        "failed_during_recovery": sum(r != 200 for r in results[:during]),
        "requests_after_recovery": len(after),
        "failed_after_recovery": sum(r != 200 for r in after),
        "hung": sum(t.is_alive() for t in workers),
        "victim_gone": victim not in worker_pids(client, model),
    }


def assert_bad_input_refused(ts, model: str, payload, field: str) -> None:
    """Through the server: HTTP 400 naming `field`, and the same worker still serving."""
    pids = worker_pids(ts.client, model)
    resp = ts.client.predict_raw(model, payload)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == field and isinstance(body["error"], str) and body["error"]
    assert worker_pids(ts.client, model) == pids
