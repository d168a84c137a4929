"""Per target, request limits and responseTimeout agree: no request the handler accepts can run
past TorchServe's responseTimeout (which would kill the worker).

Checked from the configs and the cost model only: nothing here measures a speed, so the suite
passes on a slower or busier machine. Whether a config's speed figure is conservative on this
machine is a measurement: `make bench` reports it (benchmarks/bench_limits.py).
"""
from __future__ import annotations

import pytest
import yaml

from handlers.ddpm import DdpmHandler
from handlers.errors import RequestError
from handlers.sd15 import Sd15Handler
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, unpack
from harness.targets import config_path, targets

DIFFUSION = {"ddpm": (DdpmHandler, "image_steps_per_second"), "sd15": (Sd15Handler, "steps_per_second_512")}


def config(model: str, target: str) -> dict:
    return yaml.safe_load(config_path(model, target).read_text())


@pytest.mark.parametrize(("model", "target"), [(m, t) for m in sorted(DIFFUSION) for t in targets(m)])
def test_budget_follows_the_timeout(tmp_path, model, target):
    cls, rate_key = DIFFUSION[model]
    cfg = config(model, target)
    assert 0 < cfg["handler"]["timeout_margin"] <= 0.8
    handler, ctx = load_handler(cls, model, unpack(tmp_path, model, demo_weights(model), target), target)
    expected = cfg["handler"][rate_key] * cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
    assert handler.budget == pytest.approx(expected)
    # The most expensive request the per-field limits allow is refused when over budget.
    limits = handler.request.limits
    if model == "ddpm":
        worst = {"steps": limits["max_steps"], "num_images": limits["max_num_images"], "seed": 0}
    else:
        worst = {"prompt": "x", "steps": limits["max_steps"], "width": limits["max_size"],
                 "height": limits["max_size"], "num_images": limits["max_num_images"]}
    worst_req = handler.parse({"body": worst})
    if worst_req.cost() > handler.budget:
        with pytest.raises(RequestError, match="response timeout"):
            handler.check_cost(worst_req)
        run_batch(handler, ctx, [{"body": worst}])
        assert ctx.status(0) == 400
    # Something useful always fits: one request at every default.
    default = {} if model == "ddpm" else {"prompt": "x"}
    assert handler.parse({"body": default}).cost() <= handler.budget


@pytest.mark.parametrize("target", targets("cam"))
def test_cam_full_batch_fits_the_timeout(target):
    """cam states a worst-case speed (images at its pixel limit per second): a full batch of
    them, decoded and classified, fits responseTimeout x margin."""
    cfg = config("cam", target)
    rate = cfg["handler"]["max_size_images_per_second"]
    assert cfg["batchSize"] / rate <= cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
