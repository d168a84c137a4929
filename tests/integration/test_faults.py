"""Faults against a real TorchServe: a worker killed with SIGKILL under load, a whole-server
restart, and an archive with corrupt weights next to a good one."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import zipfile

import pytest
import requests

from tests.support.torchserve import REPO, TorchServeInstance
from tests.support.traffic import valid_payloads, worker_pids


def test_killed_worker_is_replaced_and_no_request_hangs():
    payload = valid_payloads()["cam"]
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        client = ts.make_client(timeout=60, retries=0)
        victim = worker_pids(client, "cam")[0]
        results: list[int | str] = []
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                try:
                    results.append(client.predict_raw("cam", payload).status_code)
                except requests.RequestException as exc:  # must be an error, never a hang
                    results.append(type(exc).__name__)

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            pids = worker_pids(client, "cam")
            statuses = [w["status"] for w in client.describe("cam")[0]["workers"]]
            if victim not in pids and statuses and all(s == "READY" for s in statuses):
                break
            time.sleep(0.5)
        recovery = time.monotonic() - killed_at
        n_before = len(results)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert victim not in worker_pids(client, "cam")
        assert recovery < 120
        after = results[n_before:]
        assert after and all(code == 200 for code in after), after
        print(f"recovery {recovery:.1f}s, failed during fault: {sum(r != 200 for r in results[:n_before])}")


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
