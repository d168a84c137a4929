"""Per target, request limits and responseTimeout agree: no request the handler accepts can run
past TorchServe's responseTimeout (which would kill the worker)."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from handlers.cam import CamHandler
from handlers.ddpm import DdpmHandler
from handlers.sd15 import Sd15Handler
from tests.conftest import REPO, demo_weights, load_handler, png_bytes, unpack
from tests.support.context import run_batch
from weights import digits

TARGETS = ("cpu", "gpu", "arm64")
DIFFUSION = {"ddpm": (DdpmHandler, "image_steps_per_second"), "sd15": (Sd15Handler, "steps_per_second_512")}


def config(model: str, target: str) -> dict:
    return yaml.safe_load((REPO / "model_configs" / model / f"{target}.yaml").read_text())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", sorted(DIFFUSION))
def test_budget_follows_the_timeout(tmp_path, model, target):
    cls, rate_key = DIFFUSION[model]
    cfg = config(model, target)
    assert 0 < cfg["handler"]["timeout_margin"] <= 0.8
    handler, ctx = load_handler(cls, model, unpack(tmp_path, model, demo_weights(model), target), target)
    expected = cfg["handler"][rate_key] * cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
    assert handler.budget == pytest.approx(expected)
    # The most expensive request the per-field limits allow is refused when over budget.
    if model == "ddpm":
        worst = {"steps": handler.max_steps, "num_images": handler.max_images, "seed": 0}
        cost = handler.max_steps * handler.max_images
    else:
        size = handler.spec["width"].maximum
        worst = {"prompt": "x", "steps": handler.spec["steps"].maximum, "width": size, "height": size,
                 "num_images": handler.spec["num_images"].maximum}
        cost = worst["steps"] * worst["num_images"] * size * size / 512**2
    if cost > handler.budget:
        run_batch(handler, ctx, [{"body": worst}])
        assert ctx.status(0) == 400
    # Something useful always fits: one default request.
    default = {"steps": 50, "seed": 0} if model == "ddpm" else {"prompt": "x", "steps": 25}
    assert handler.cost(handler.parse({"body": default}, 0)) <= handler.budget


@pytest.mark.parametrize("model", sorted(DIFFUSION))
def test_cpu_rate_is_conservative_here(tmp_path, model):
    """The cpu config's speed figure is at most what this CPU really does with the demo model,
    so accepted work (cost <= budget) ends within responseTimeout x margin."""
    cls, rate_key = DIFFUSION[model]
    handler, ctx = load_handler(cls, model, unpack(tmp_path, model, demo_weights(model)))
    if model == "ddpm":
        req, units = {"steps": 20, "seed": 0}, 20
    else:
        req, units = {"prompt": "x", "steps": 4, "width": 256, "height": 256, "seed": 0}, 4 * 256 * 256 / 512**2
    run_batch(handler, ctx, [{"body": req}])  # warm-up
    start = time.perf_counter()
    run_batch(handler, ctx, [{"body": req}])
    measured = units / (time.perf_counter() - start)
    assert ctx.status(0) == 200
    assert measured >= config(model, "cpu")["handler"][rate_key], measured


def test_cam_full_batch_fits_the_timeout(tmp_path):
    cfg = config("cam", "cpu")
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path, "cam", demo_weights("cam")))
    images, _ = digits.load_arrays()
    big = png_bytes(digits.to_pil(images[0], 1000))  # a large upload: decoding is part of the cost
    rows = [{"body": big}] * cfg["batchSize"]
    run_batch(handler, ctx, rows)
    start = time.perf_counter()
    outs = run_batch(handler, ctx, rows)
    elapsed = time.perf_counter() - start
    assert all(json.loads(o)["predictions"] for o in outs)
    assert elapsed * 10 < cfg["responseTimeout"], elapsed
