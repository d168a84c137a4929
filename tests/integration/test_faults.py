"""Faults against a real TorchServe: a worker killed with SIGKILL under load, a whole-server
restart, and an archive with corrupt weights next to a good one."""
from __future__ import annotations

import os
import shutil
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness import REPO
from harness.torchserve import TorchServeInstance
from harness.traffic import kill_worker_under_load, valid_payloads, worker_pids


def test_killed_worker_is_replaced_and_no_request_hangs():
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        # A cam request takes ~50 ms: 15 s bounds the requests TorchServe loses (see traffic.py).
        r = kill_worker_under_load(ts, "cam", valid_payloads()["cam"], threads=4, client_timeout=15)
    print(r)
    assert r["recovered"] and r["victim_gone"] and r["recovery_s"] < 120
    assert r["hung"] == 0, "a client thread never came back"
    # Only the dead worker's batch fails: each failure is an error answer (507 "Worker died.") or,
    # for a batch still being gathered, a request TorchServe dropped that ended at the client timeout.
    assert r["failed_around_kill"] == r["error_answers_around_kill"] + r["lost_around_kill"] <= 4, r["failures"]
    assert r["requests_after_recovery"] >= 20 and r["failed_after_recovery"] == 0


def test_torchserve_drops_a_batch_being_gathered_when_its_worker_dies():
    """Pins down a TorchServe 0.12 behaviour docs/reliability.md describes: a
    request waiting for its batch to fill (maxBatchDelay) when the worker process dies gets no
    answer at all (BatchAggregator.getRequest() is interrupted before the batch exists, so no
    "Worker died." is sent); the client's timeout is what ends it. If this test fails, TorchServe
    answers such requests now: update both documents."""
    payload = valid_payloads()["cam"]
    with TorchServeInstance(archives=["cam.mar"], load_at_start=False) as ts:
        ts.client.register("cam.mar", batch_size=8, max_batch_delay=6000, initial_workers=1)
        ts.client.scale("cam", 1)  # the archive's config asks for 2 workers; one holds the request
        assert ts.client.predict_raw("cam", payload).status_code == 200  # warm: the next one arrives at once
        (victim,) = worker_pids(ts.client, "cam")
        client = ts.make_client(timeout=10, retries=0)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(client.predict_raw, "cam", payload)
            time.sleep(2)  # mid-way through the 6 s the worker thread waits for 7 more requests
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(requests.RequestException):
                print("answered:", pending.result().status_code)
            assert time.monotonic() - started >= 9.5  # no error answer came: the client timed out
        ts.client.wait_ready(["cam"], timeout=120)
        assert worker_pids(ts.client, "cam") != [victim]
        assert ts.client.predict_raw("cam", payload).status_code == 200


def test_restart_brings_models_back():
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        assert ts.client.predict_raw("cam", valid_payloads()["cam"]).status_code == 200
        first = worker_pids(ts.client, "cam")
        ts.restart()  # load_models=all: the archive in the store comes back by itself
        client = ts.client
        assert worker_pids(client, "cam") != first
        client.wait_ready(["cam"], timeout=180)
        assert client.predict_raw("cam", valid_payloads()["cam"]).status_code == 200


def test_corrupt_weights_fail_their_load_only(tmp_path):
    broken = tmp_path / "broken.mar"
    with zipfile.ZipFile(REPO / "model_store" / "cam.mar") as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "weights/model.safetensors":
                data = b"not a safetensors file"
            if item.filename == "MAR-INF/MANIFEST.json":
                data = data.replace(b'"modelName": "cam"', b'"modelName": "broken"')
            dst.writestr(item, data)
    store = tmp_path / "store"
    store.mkdir()
    (store / "cam.mar").symlink_to(REPO / "model_store" / "cam.mar")
    shutil.copy(broken, store / "broken.mar")
    with TorchServeInstance(archives=["cam.mar", "broken.mar"], source_store=store, load_at_start=False) as ts:
        ts.client.register("cam.mar")
        with pytest.raises(Exception):
            ts.client.register("broken.mar", initial_workers=1)
        assert ts.client.predict_raw("cam", valid_payloads()["cam"]).status_code == 200
        deadline = time.monotonic() + 30
        while "model.safetensors" not in ts.model_log() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = ts.model_log()
        assert "cannot load weights file" in log and "weights/model.safetensors" in log
