"""The design's usage line: `source .venv/bin/activate`, then plain `torchserve --start` (no
flags) in the repo root serves the store with config.properties, and never a stale snapshot.

`make setup` makes the venv's activate export TS_CONFIG_FILE=<repo>/config.properties (TorchServe
reads its config only from --ts-config or TS_CONFIG_FILE). The server runs in a directory laid
out like the repo root (model_store/ holding only cam.mar, so it stays cheap) on the FIXED ports
of config.properties: the other tests' servers use free ephemeral ports, but a `make start`
server left running would clash, so the test fails with a clear message instead.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from clients.api import TorchServeClient
from harness import REPO
from harness.inprocess import png_bytes
from harness.torchserve import key_file_written
from weights import digits

ACTIVATE = REPO / ".venv" / "bin" / "activate"


def properties() -> dict:
    props = {}
    for line in (REPO / "config.properties").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def ports(props: dict) -> list[int]:
    urls = [props[f"{api}_address"] for api in ("inference", "management", "metrics")]
    return [urlparse(u).port for u in urls] + [int(props["grpc_inference_port"]),
                                               int(props["grpc_management_port"])]


def busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stale_snapshot(root: Path) -> None:
    """What a previous plain start leaves in logs/config/, with a different batch size; loaded
    as the server's whole config when TorchServe starts without a config file and without --ncs."""
    snapshot = {"name": "20200101000000000-shutdown.cfg", "modelCount": 1, "created": 1577836800000,
                "models": {"cam": {"1.0": {"defaultVersion": True, "marName": "cam.mar",
                                           "minWorkers": 1, "maxWorkers": 1, "batchSize": 3,
                                           "maxBatchDelay": 777, "responseTimeout": 120}}}}
    (root / "logs" / "config").mkdir(parents=True)
    (root / "logs" / "config" / snapshot["name"]).write_text(
        "inference_address=http://127.0.0.1:18080\nload_models=cam.mar\nmodel_store=model_store\n"
        f"model_snapshot={json.dumps(snapshot)}\n")


def shell(root: Path, env: dict, command: str, log: Path, timeout: float) -> int:
    # The daemon inherits stdout: write it to a file, never to a pipe this test would wait on.
    with open(log, "ab") as out:
        return subprocess.run(["bash", "-c", f'source "{ACTIVATE}" && cd "{root}" && {command}'],
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


def test_plain_torchserve_start_serves_the_store(tmp_path):
    assert f'export TS_CONFIG_FILE="{REPO}/config.properties"' in ACTIVATE.read_text(), \
        "the venv's activate does not export TS_CONFIG_FILE: run 'make setup'"
    props = properties()
    in_use = [p for p in ports(props) if busy(p)]
    if in_use:
        pytest.fail(f"ports {in_use} of config.properties are in use (a TorchServe from "
                    "'make start' or 'torchserve --start'? stop it first: 'make stop')")
    archive = REPO / "model_store" / "cam.mar"
    assert archive.exists(), f"{archive} missing: run ./archive.sh first"

    root = tmp_path / "root"  # laid out like the repo root
    (root / "model_store").mkdir(parents=True)
    (root / "model_store" / "cam.mar").symlink_to(archive)
    (root / "tmp").mkdir()
    stale_snapshot(root)
    # A user's shell: no TS_CONFIG_FILE before activate, no PYTHONPATH (handlers come from the
    # archive). TMPDIR/TEMP private: its own pid file, so --stop stops this server only.
    env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    env.update(TMPDIR=str(root / "tmp"), TEMP=str(root / "tmp"), TMP=str(root / "tmp"))
    log = tmp_path / "torchserve.out"

    try:
        assert shell(root, env, "torchserve --start", log, 120) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 120
        while not key_file_written(root / "key_file.json"):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        client = TorchServeClient(props["inference_address"], props["management_address"],
                                  props["metrics_address"], key_file=root / "key_file.json")
        deadline = time.monotonic() + 30
        while True:  # the key file is written before the listeners are bound
            try:
                client.list_models()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        (desc,) = client.wait_ready(["cam"], timeout=180)
        text = log.read_text()
        assert f"Config file: {REPO}/config.properties" in text
        assert f"Model Store: {root}/model_store" in text
        assert [m["modelName"] for m in client.list_models()] == ["cam"]
        cfg = yaml.safe_load((REPO / "model_configs" / "cam" / "cpu.yaml").read_text())
        # The archive's model config, not the stale snapshot's batchSize 3 / maxBatchDelay 777.
        assert (desc["batchSize"], desc["maxBatchDelay"]) == (cfg["batchSize"], cfg["maxBatchDelay"])

        images, labels = digits.load_arrays()
        _, test = digits.split_indices()
        i = int(test[0])
        r = client.predict_raw("cam", png_bytes(digits.to_pil(images[i], 64)))
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["index"] == int(labels[i])
    finally:
        shell(root, env, "torchserve --stop", log, 60)
        deadline = time.monotonic() + 30
        while any(busy(p) for p in ports(props)) and time.monotonic() < deadline:
            time.sleep(0.5)
        pid_file = root / "tmp" / ".model_server.pid"
        if any(busy(p) for p in ports(props)) and pid_file.exists():
            os.kill(int(pid_file.read_text().strip()), 9)  # our own server, by its pid
            pytest.fail("torchserve --stop did not stop the server; killed it")


def test_private_servers_ignore_an_activated_venv(monkeypatch):
    """TS_CONFIG_FILE beats --ts-config in TorchServe (ts/model_server.py and ConfigManager read
    the variable first), so with the venv activated the tests' private servers would start on
    config.properties' fixed ports: the launcher must drop it from their environment."""
    from harness.torchserve import TorchServeInstance

    monkeypatch.setenv("TS_CONFIG_FILE", str(REPO / "config.properties"))
    with TorchServeInstance(startup_timeout=60) as ts:
        assert ts.client.list_models() == []  # answers on its own free port
        assert ts.ports["inference"] not in ports(properties())
