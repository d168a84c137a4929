"""The sd15 archive (no-archive format, built by archive.sh) in a real TorchServe."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness.bad_inputs import sd15_cases
from harness.inprocess import demo_weights
from harness.loras import random_lora
from harness.torchserve import TorchServeInstance, run_archive_sh
from harness.traffic import assert_bad_input_refused
from weights import sd15_captions as C

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



def test_the_demo_archive_serves_its_trained_loras(server):
    """The demo archive carries the LoRAs of weights/demo/sd15/loras/: describe lists them, and
    "a rainbow handwritten 7"-style prompts come out in rainbow bands with `rainbow` and not without
    (an image at a time, as a user sends them; the judge is weights/sd15_captions.py's)."""
    (desc,) = server.client.describe("sd15", customized=True)
    meta = desc["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert {(d["name"], d["format"]) for d in meta["loras"]} == {("rainbow", "diffusers"), ("italic", "kohya")}

    def shows_rainbow(payload):
        resp = server.client.predict_raw("sd15", payload, accept="image/png")
        assert resp.status_code == 200, resp.text[:300]
        return C.is_rainbow(Image.open(io.BytesIO(resp.content)).convert("RGB"))

    bodies = [{"prompt": f"a rainbow handwritten {d}", "steps": 25, "seed": d} for d in range(4)]
    with_lora = sum(shows_rainbow({**b, "loras": [{"name": "rainbow"}]}) for b in bodies)
    without = sum(shows_rainbow(b) for b in bodies)
    assert with_lora >= 3 and without <= 1, (with_lora, without)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """The demo weights with a loras/ folder of two random LoRAs (diffusers and kohya format),
    archived by archive.sh as `sd15_loras`: LoRA files travel in the archive's weights."""
    root = tmp_path_factory.mktemp("sd15-loras")
    weights = root / "weights"
    shutil.copytree(demo_weights("sd15"), weights, ignore=shutil.ignore_patterns("loras"))
    random_lora(weights, weights / "loras" / "styled.safetensors", seed=1, text_encoder=True)
    random_lora(weights, weights / "loras" / "kohya-styled.safetensors", seed=2, fmt="kohya")
    run = run_archive_sh("--store", str(root / "store"), "--name", "sd15_loras", "--weights", str(weights), "sd15")
    assert run.returncode == 0, run.stderr
    with TorchServeInstance(archives=["sd15_loras"], source_store=root / "store") as ts:
        yield ts


def test_the_archives_loras_are_listed_and_applied(lora_server):
    """Describe lists the archive's LoRAs; a request applies one (its image differs from the base
    model's), scale 0 is the base model's image exactly, an unknown name is a 400."""
    (desc,) = lora_server.client.describe("sd15_loras", customized=True)
    meta = desc["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert {(d["name"], d["format"]) for d in meta["loras"]} == {("styled", "diffusers"), ("kohya-styled", "kohya")}
    assert meta["refused_loras"] == []

    def image(payload):
        resp = lora_server.client.predict_raw("sd15_loras", payload, accept="image/png")
        assert resp.status_code == 200, resp.text[:300]
        return np.asarray(Image.open(io.BytesIO(resp.content)), dtype=int)

    body = {**BASE, "prompt": "a red handwritten 3", "steps": 10, "seed": 5}
    base = image(body)
    for name in ("styled", "kohya-styled"):
        assert np.abs(image({**body, "loras": [{"name": name}]}) - base).mean() > 2, name
    assert np.array_equal(image({**body, "loras": [{"name": "styled", "scale": 0.0}]}), base)
    assert_bad_input_refused(lora_server, "sd15_loras", {**body, "loras": [{"name": "no-such-lora"}]}, "loras")
