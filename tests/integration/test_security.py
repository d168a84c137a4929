"""Security defaults against a real TorchServe: loopback only, tokens (incl. rotation), the
key file's permissions, the URL allow-list for registration, and the request size limits."""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import stat
import subprocess

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from clients.api import TorchServeClient
from harness import REPO
from harness.torchserve import TorchServeInstance, read_properties

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["cam.mar"], extra={"max_request_size": LIMIT}) as ts:
        yield ts


def small_png() -> bytes:
    from harness.bad_inputs import good_png

    return good_png()


def test_config_binds_loopback_only():
    props = read_properties(REPO / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert props[key] == "127.0.0.1", key
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"


def test_server_listens_on_loopback_only(server):
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    listening = [c.laddr for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening, "no listening sockets found"
    assert len(listening) >= 5, listening  # REST x3 + gRPC x2
    for addr in listening:
        ip = ipaddress.ip_address(addr.ip)
        assert (getattr(ip, "ipv4_mapped", None) or ip).is_loopback, listening


def test_key_file_private_and_ignored(server):
    mode = stat.S_IMODE(os.stat(server.dir / "key_file.json").st_mode)
    assert mode & (stat.S_IRWXG | stat.S_IRWXO) == 0, oct(mode)
    ignored = subprocess.run(["git", "check-ignore", "-q", "key_file.json"], cwd=REPO)
    assert ignored.returncode == 0


def test_rotation_refuses_old_key_and_client_recovers(server):
    client = server.make_client()
    old = client.keys.inference
    other = server.make_client()  # holds the old key in memory
    client.rotate_key("inference")
    assert client.keys.inference != old
    url = f"{server.url('inference')}/predictions/cam"
    stale = requests.post(url, data=small_png(), headers={"Authorization": f"Bearer {old}"}, timeout=30)
    assert stale.status_code == 400 and "InvalidKeyException" in stale.text
    assert other.predict("cam", small_png())["predictions"]  # re-read the key file once
    assert other.keys.inference == client.keys.inference


def test_refused_key_gives_clear_error(server, tmp_path):
    bogus = tmp_path / "key_file.json"
    bogus.write_text('{"inference": {"key": "wrong"}, "management": {"key": "wrong"}}')
    client = TorchServeClient(inference_url=server.url("inference"), key_file=bogus, timeout=30)
    with pytest.raises(Exception, match="refused the inference token"):
        client.predict("cam", small_png())


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.mar", "file:///etc/passwd", "../cam.mar",
                                 "https://example.com/cam.mar", "file:///tmp/other/cam.mar"])
def test_registration_outside_the_store_is_refused(server, url):
    before = server.client.list_models()
    resp = requests.post(f"{server.url('management')}/models", params={"url": url, "model_name": "evil"},
                         headers={"Authorization": f"Bearer {server.client.keys.management}"}, timeout=30)
    assert 400 <= resp.status_code < 500, resp.text
    assert server.client.list_models() == before


def test_request_over_size_limit_is_refused(server):
    resp = server.client.predict_raw("cam", b"\0" * (2 * LIMIT))
    assert resp.status_code in (400, 413)
    assert server.client.predict_raw("cam", small_png()).status_code == 200


def test_largest_legitimate_upload_fits_and_one_byte_more_is_refused():
    """With the real config.properties limits: the worst case the cam archive accepts (a
    4000x4000 RGB PNG of noise, as base64 in JSON: ~64 MB) is served; a body of
    max_request_size + 1 bytes gets 413 before any worker sees it."""
    limit = int(next(line.split("=", 1)[1] for line in (REPO / "config.properties").read_text().splitlines()
                     if line.startswith("max_request_size=")))
    noise = np.random.default_rng(0).integers(0, 256, (4000, 4000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    payload = {"image": base64.b64encode(buf.getvalue()).decode()}
    assert 0.9 * limit < len(json.dumps(payload)) < limit
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        resp = ts.client.predict_raw("cam", payload)
        assert resp.status_code == 200, resp.text[:300]
        assert resp.json()["predictions"]
        assert ts.client.predict_raw("cam", b"\0" * (limit + 1)).status_code == 413
