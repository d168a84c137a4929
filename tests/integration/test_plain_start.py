"""The design's usage line: `source .venv/bin/activate`, then plain `torchserve --start` (no
flags) in the repo root serves the store with config.properties, and never a stale snapshot.

`make setup` makes the venv's activate export TS_CONFIG_FILE=<repo>/config.properties (TorchServe
reads its config only from --ts-config or TS_CONFIG_FILE). The server runs in a directory laid
out like the repo root (model_store/ holding only cam.mar, so it stays cheap) on the FIXED ports
of config.properties (8080-8082, gRPC 7070/7071), which a `make start` server may hold. So the
whole scenario (`torchserve --start`, the client's requests, `torchserve --stop`) runs in a
network namespace of its own (`unshare -n`, loopback brought up with `ip link set lo up`; entered
with `nsenter`), and the server gets its own TMPDIR/TEMP: its pid file and the workers' unix
sockets are files, shared across namespaces. That needs root, util-linux's unshare/nsenter and
iproute2's ip; without them the test is skipped, with the reason. Whatever the outcome, every
process left in the namespace (TorchServe's java, its workers) and the namespace's holder are
killed afterwards.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from harness import REPO
from harness.inprocess import held_out_digit
from harness.netns import ACTIVATE, Unavailable, namespace, user_env
from harness.torchserve import key_file_written, read_properties

NETNS_NEEDED = ("needs a network namespace of its own: the test must bind config.properties' "
                "fixed ports, which a `make start` server may hold")


def properties() -> dict:
    return read_properties(REPO / "config.properties")


def ports(props: dict) -> list[int]:
    urls = [props[f"{api}_address"] for api in ("inference", "management", "metrics")]
    return [urlparse(u).port for u in urls] + [int(props["grpc_inference_port"]),
                                               int(props["grpc_management_port"])]


@pytest.fixture
def netns():
    try:
        with namespace() as ns:
            yield ns
    except Unavailable as err:
        pytest.skip(f"{NETNS_NEEDED} ({err})")


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


# The client's side, run in the namespace (the server's ports are only there): waits for the
# listeners and the model, then lists, describes and asks; prints what it saw as JSON.
CLIENT = """
import json, sys
from clients.api import TorchServeClient
from harness.torchserve import wait_listening
inference, management, metrics, key_file, image = sys.argv[1:]
client = TorchServeClient(inference, management, metrics, key_file=key_file)
wait_listening(client)
(desc,) = client.wait_ready(["cam"], timeout=180)
models = [m["modelName"] for m in client.list_models()]
with open(image, "rb") as f:
    r = client.predict_raw("cam", f.read())
print(json.dumps({"desc": desc, "models": models, "status": r.status_code, "text": r.text}))
"""


def test_plain_torchserve_start_serves_the_store(tmp_path, netns):
    assert f'export TS_CONFIG_FILE="{REPO}/config.properties"' in ACTIVATE.read_text(), \
        "the venv's activate does not export TS_CONFIG_FILE: run 'make setup'"
    props = properties()
    archive = REPO / "model_store" / "cam.mar"
    assert archive.exists(), f"{archive} missing: run ./archive.sh first"

    root = tmp_path / "root"  # laid out like the repo root
    (root / "model_store").mkdir(parents=True)
    (root / "model_store" / "cam.mar").symlink_to(archive)
    stale_snapshot(root)
    env = user_env(root)
    log = tmp_path / "torchserve.out"
    image = tmp_path / "digit.png"
    label = held_out_digit(image)

    try:
        assert netns.shell(root, env, "torchserve --start", log, 120) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 120
        while not key_file_written(root / "key_file.json"):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        client = netns.python(CLIENT, props["inference_address"], props["management_address"],
                              props["metrics_address"], str(root / "key_file.json"), str(image), timeout=400)
        assert client.returncode == 0, client.stderr[-3000:] + "\n" + log.read_text()[-3000:]
        seen = json.loads(client.stdout.splitlines()[-1])
        text = log.read_text()
        assert f"Config file: {REPO}/config.properties" in text
        assert f"Model Store: {root}/model_store" in text
        assert seen["models"] == ["cam"]
        cfg = yaml.safe_load((REPO / "model_configs" / "cam" / "cpu.yaml").read_text())
        # The archive's model config, not the stale snapshot's batchSize 3 / maxBatchDelay 777.
        desc = seen["desc"]
        assert (desc["batchSize"], desc["maxBatchDelay"]) == (cfg["batchSize"], cfg["maxBatchDelay"])
        assert seen["status"] == 200, seen["text"]
        assert json.loads(seen["text"])["predictions"][0]["index"] == label
    finally:
        netns.shell(root, env, "torchserve --stop", log, 60)
        deadline = time.monotonic() + 30
        while netns.others() and time.monotonic() < deadline:
            time.sleep(0.5)
        if left := netns.others():  # the netns fixture kills them
            pytest.fail(f"torchserve --stop did not stop the server: processes {left} still run")


def test_private_servers_ignore_an_activated_venv(monkeypatch):
    """TS_CONFIG_FILE beats --ts-config in TorchServe (ts/model_server.py and ConfigManager read
    the variable first), so with the venv activated the tests' private servers would start on
    config.properties' fixed ports: the launcher must drop it from their environment."""
    from harness.torchserve import TorchServeInstance

    monkeypatch.setenv("TS_CONFIG_FILE", str(REPO / "config.properties"))
    with TorchServeInstance(startup_timeout=60) as ts:
        assert ts.client.list_models() == []  # answers on its own free port
        assert ts.ports["inference"] not in ports(properties())
