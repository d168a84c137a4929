"""The cam archive built by archive.sh, served by a real TorchServe the test starts itself.

The server starts with an empty store; the test registers cam.mar through the management API
with batch settings, then talks REST to it.
"""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from harness.bad_inputs import b64, cam_cases
from harness.inprocess import png_bytes
from harness.torchserve import TorchServeInstance
from harness.traffic import assert_bad_input_refused
from weights import digits

BATCH = 8


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["cam.mar"], load_at_start=False) as ts:
        assert ts.client.list_models() == []
        ts.client.register("cam.mar", batch_size=BATCH, max_batch_delay=300, initial_workers=1)
        ts.client.wait_ready(["cam"], timeout=180)
        yield ts


@pytest.fixture(scope="module")
def digit_pngs():
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    return [png_bytes(digits.to_pil(images[i], 64)) for i in test[:16]], labels[test[:16]]


def test_registered_with_batch_settings(server):
    (desc,) = server.client.describe("cam")
    assert desc["batchSize"] == BATCH and desc["maxBatchDelay"] == 300
    statuses = [w["status"] for w in desc["workers"]]
    assert statuses and all(s == "READY" for s in statuses)


def test_concurrent_requests_are_batched(server, digit_pngs):
    pngs, labels = digit_pngs
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: server.client.predict_raw("cam", p), pngs))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    correct = sum(r.json()["predictions"][0]["index"] == int(y) for r, y in zip(responses, labels))
    assert correct >= 14


@pytest.mark.parametrize("case", cam_cases(), ids=lambda c: c[0])
def test_bad_input_gets_400_and_worker_survives(server, digit_pngs, case):
    _, payload, field = case
    assert_bad_input_refused(server, "cam", payload, field)
    assert server.client.predict_raw("cam", digit_pngs[0][0]).status_code == 200


def test_empty_body_and_form_data(server):
    headers = {"Authorization": f"Bearer {server.client.keys.inference}"}
    url = f"{server.url('inference')}/predictions/cam"
    empty = requests.post(url, headers=headers, timeout=30)
    assert empty.status_code == 400 and empty.json()["field"] == "body"
    # curl -d '{...}' without a Content-Type: form data, still a clear 400 (never a 503)
    form = requests.post(url, headers=headers, data="topk=3&image=abc", timeout=30)
    assert form.status_code == 400 and form.json()["field"]


def test_mixed_batch_answers_good_requests(server, digit_pngs):
    pngs, _ = digit_pngs
    payloads = [pngs[i] for i in range(7)]
    payloads.insert(3, {"image": b64(pngs[0]), "topk": 99})
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: server.client.predict_raw("cam", p), payloads))
    codes = [r.status_code for r in responses]
    assert codes == [200, 200, 200, 400, 200, 200, 200, 200]
    assert responses[3].json()["field"] == "topk"
    assert int(responses[3].headers["X-Batch-Size"]) > 1  # it failed inside a batch


def test_explanations_and_png(server, digit_pngs):
    png = digit_pngs[0][0]
    explained = server.client.predict("cam", png, explain=True)
    assert set(explained) == {"target", "label", "method", "map"}
    raw = server.client.predict_raw("cam", png, accept="image/png")
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(raw.content)).format == "PNG"
    full = server.client.predict("cam", {"image": b64(png)})
    overlay = Image.open(io.BytesIO(base64.b64decode(full["cam"]["overlay"])))
    assert overlay.size == (128, 128)


def test_tokens_are_required(server, digit_pngs):
    url = f"{server.url('inference')}/predictions/cam"
    missing = requests.post(url, data=digit_pngs[0][0], timeout=30)
    wrong = requests.post(url, data=digit_pngs[0][0], headers={"Authorization": "Bearer nope"}, timeout=30)
    for resp in (missing, wrong):
        assert resp.status_code == 400 and "InvalidKeyException" in resp.text
    mgmt = requests.get(f"{server.url('management')}/models", timeout=30)
    assert mgmt.status_code == 400 and "InvalidKeyException" in mgmt.text
    inference_key_on_management = requests.get(
        f"{server.url('management')}/models",
        headers={"Authorization": f"Bearer {server.client.keys.inference}"}, timeout=30)
    assert inference_key_on_management.status_code == 400
    ok = requests.post(url, data=digit_pngs[0][0], timeout=30,
                       headers={"Authorization": f"Bearer {server.client.keys.inference}"})
    assert ok.status_code == 200 and json.loads(ok.text)["predictions"]


def test_describe_returns_the_request_schema(server):
    """`GET /models/cam?customized=true` reaches the handler's describe path (BaseHandler.handle),
    not the inference path: the request schema with this archive's limits, methods, profile."""
    (desc,) = server.client.describe("cam", customized=True)
    meta = desc["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert "error" not in meta, meta
    assert meta["model"] == "cam" and meta["version"] == "1.0" and meta["profile"] == "demo"
    assert meta["request_schema"]["properties"]["topk"]["maximum"] == 10
    assert "gradcam" in meta["methods"]
    assert meta["precision"] == "int8 (x86)"  # the cpu config's; a worker that stayed float says float32

