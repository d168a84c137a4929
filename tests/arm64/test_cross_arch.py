"""(c) of `make test-arm64`: what the contract promises across architectures. The aarch64 answers
come from the served archives (conftest.py); the x86 references from the same handlers, arm64
configs and weights loaded in this x86 process.

- cam (int8, qnnpack, as arm64.yaml says): on 100 held-out digits, the int8 contract against
  float32 on x86 (handlers/cam/contract.py; the same promise the unit tests check
  on x86), and within CROSS_ARCH_INT8 of x86 running the same engine and calibration.
- ddpm, sd15: a seeded request gives the same image alone and inside a batch on aarch64 (within
  1 grey level, as on x86) and, on x86 vs aarch64, within CROSS_ARCH_LEVELS. Why not identical:
  torch 2.14.1 on x86 (oneDNN, AVX2) and torch 2.10.0 on aarch64 (NEON) sum convolutions and
  attention in another order, so the latents differ in the last float bits; the sampler carries
  that over its steps and PNG rounds it to the nearest level, which moves a few pixels by a level.
"""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from clients.verify import CROSS_ARCH_LEVELS  # grey levels per pixel, x86 vs aarch64: ddpm, sd15
from harness.bad_inputs import b64
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, png_bytes, unpack
from tests.support import cam_contract
from weights import digits

# cam int8 (qnnpack) on aarch64 vs on x86, same calibration images: the integer kernels agree, but
# the float calibration pass sums in another order, so a quantization scale can differ in its last
# bits and move a value by one int8 step. Bounds on probabilities and maps (in [0, 1]).
CROSS_ARCH_INT8 = {"probability": 0.01, "map": 0.03}

SEEDED = {
    "ddpm": {"steps": 6, "seed": 2024, "num_images": 2},
    "sd15": {"prompt": "a red digit three", "steps": 4, "width": 64, "height": 64, "seed": 77},
}


@pytest.fixture(scope="module")
def x86(tmp_path_factory):
    """(model, handler overrides) -> (handler, context) on this x86 host: the arm64 config with
    those overrides, the archive's weights."""
    from handlers.cam.handler import CamHandler
    from handlers.ddpm.handler import DdpmHandler
    from handlers.sd15.handler import Sd15Handler

    classes = {"cam": CamHandler, "ddpm": DdpmHandler, "sd15": Sd15Handler}
    loaded = {}

    def get(model: str, **overrides):
        key = (model, *sorted(overrides.items()))
        if key not in loaded:
            model_dir = unpack(tmp_path_factory.mktemp(model), model, demo_weights(model), "arm64", overrides)
            loaded[key] = load_handler(classes[model], model, model_dir, "arm64")
        return loaded[key]

    return get


def x86_answer(x86, model: str, payload, **overrides) -> dict:
    handler, ctx = x86(model, **overrides)
    (out,) = run_batch(handler, ctx, [{"body": payload}])
    assert ctx.status(0) == 200, out
    return json.loads(out)


def pixels(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))), dtype=int)


def max_gap(a: list[str], b: list[str]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(pixels(x) - pixels(y)).max()) for x, y in zip(a, b))


def test_cam_int8_keeps_the_contract_on_100_heldout_digits(served, x86):
    images, _ = digits.load_arrays()
    _, test = digits.split_indices()
    payloads = [{"image": b64(png_bytes(digits.to_pil(images[i], 64))), "topk": 10} for i in test[:100]]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: served.client.predict_raw("cam", p), payloads))
    assert [r.status_code for r in responses] == [200] * len(payloads)
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    answers = [r.json() for r in responses]
    vs_float32 = [cam_contract.compare_precision(a, x86_answer(x86, "cam", p, quantize=None), "int8")
                  for a, p in zip(answers, payloads)]
    worst = {k: (min if k == "correlation" else max)(g[k] for g in vs_float32) for k in vs_float32[0]}
    print(f"\n[arm64] cam int8 (aarch64) vs float32 (x86) on {len(answers)} digits: top-1 identical; worst {worst}")
    same_engine = [cam_contract.compare_precision(a, x86_answer(x86, "cam", p), "int8")
                   for a, p in zip(answers, payloads)]
    worst = {k: max(g[k] for g in same_engine) for k in ("probability", "map")}
    print(f"[arm64] cam int8, aarch64 vs x86 (both qnnpack): largest gaps {worst}")
    assert all(worst[k] <= CROSS_ARCH_INT8[k] for k in CROSS_ARCH_INT8), worst


@pytest.mark.parametrize("model", sorted(SEEDED))
def test_seeded_images_alone_batched_and_across_architectures(served, x86, model):
    req = SEEDED[model]
    alone = served.client.predict(model, req)
    others = [{**req, "seed": s, "num_images": 1} for s in range(3)]
    with ThreadPoolExecutor(len(others) + 1) as pool:
        responses = list(pool.map(lambda p: served.client.predict_raw(model, p), [req, *others]))
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert int(responses[0].headers["X-Batch-Size"]) > 1
    batched = max_gap(alone["images"], responses[0].json()["images"])
    across = max_gap(alone["images"], x86_answer(x86, model, req)["images"])
    print(f"\n[arm64] {model} seeded {req}: aarch64 alone vs batched {batched}, aarch64 vs x86 {across} grey levels")
    assert batched <= 1
    assert across <= CROSS_ARCH_LEVELS
