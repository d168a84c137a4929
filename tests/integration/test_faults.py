"""Faults against a real TorchServe: a worker killed with SIGKILL under load, a whole-server
restart, and an archive with corrupt weights next to a good one."""
from __future__ import annotations

import shutil
import time
import zipfile

import pytest

from tests.support.torchserve import REPO, TorchServeInstance
from tests.support.traffic import kill_worker_under_load, valid_payloads, worker_pids


def test_killed_worker_is_replaced_and_no_request_hangs():
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        r = kill_worker_under_load(ts, "cam", valid_payloads()["cam"])
    print(r)
    assert r["recovered"] and r["victim_gone"] and r["recovery_s"] < 120
    assert r["hung"] == 0, "a request hung"
    assert r["requests_after_recovery"] > 0 and r["failed_after_recovery"] == 0


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
