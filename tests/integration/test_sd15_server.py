"""The sd15 archive (no-archive format, built by archive.sh) in a real TorchServe."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness.bad_inputs import sd15_cases
from harness.torchserve import TorchServeInstance
from harness.traffic import assert_bad_input_refused

BASE = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["sd15"]) as ts:
        yield ts


@pytest.mark.parametrize("case", sd15_cases(), ids=lambda c: c[0])
def test_bad_input_gets_400_and_worker_survives(server, case):
    _, payload, field = case
    assert_bad_input_refused(server, "sd15", payload, field)


def test_seeded_png_same_alone_and_batched(server):
    def predict(payload):
        return server.client.predict_raw("sd15", payload, accept="image/png")

    req = {**BASE, "seed": 77}
    alone = predict(req)
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    assert alone.headers["X-Batch-Size"] == "1" and alone.headers["X-Seed"] == "77"
    payloads = [req, {**BASE, "seed": 1, "prompt": "a cat"}, {**BASE, "seed": 2}, {**BASE, "seed": 3}]
    with ThreadPoolExecutor(5) as pool:
        # A slower request keeps the worker busy while the four queue up: they form one batch.
        busy = pool.submit(predict, {**BASE, "steps": 100, "width": 128, "height": 128, "seed": 0})  # ~1.7 s
        time.sleep(0.3)
        responses = list(pool.map(predict, payloads))
        assert busy.result().status_code == 200
    assert [r.status_code for r in responses] == [200] * 4
    assert int(responses[0].headers["X-Batch-Size"]) > 1
    a = np.asarray(Image.open(io.BytesIO(alone.content)), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(responses[0].content)), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_1024_response_fits_the_size_limit(server):
    resp = server.client.predict_raw("sd15", {**BASE, "width": 1024, "height": 1024, "steps": 1, "seed": 0})
    assert resp.status_code == 200, resp.text[:300]
    body = resp.json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (1024, 1024)
    limit = int(dict(line.split("=", 1) for line in (server.dir / "config.properties").read_text().splitlines())
                ["max_response_size"])
    assert len(resp.content) < limit
