"""Per target, request limits and responseTimeout agree: no request the handler accepts can run
past TorchServe's responseTimeout (which would kill the worker).

The diffusion models' budget follows the speed each worker measures (handlers/streaming.py
StepClock); the tests set that clock to chosen figures, so nothing here depends on this machine's
speed. Whether the measured figures hold is a measurement: `make bench` (benchmarks/bench_limits.py).
"""
from __future__ import annotations

import pytest
import yaml

from deploy.targets import config_path, targets
from handlers.core.budget import StepClock
from handlers.core.errors import RequestError
from handlers.ddpm.handler import DdpmHandler
from handlers.sd15.handler import Sd15Handler
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, unpack

DIFFUSION = {"ddpm": DdpmHandler, "sd15": Sd15Handler}


def config(model: str, target: str) -> dict:
    return yaml.safe_load(config_path(model, target).read_text())


def worst_request(model: str, limits: dict) -> dict:
    """The most expensive request the per-field limits allow."""
    if model == "ddpm":
        return {"steps": limits["max_steps"], "num_images": limits["max_num_images"], "seed": 0}
    return {"prompt": "x", "steps": limits["max_steps"], "width": limits["max_size"],
            "height": limits["max_size"], "num_images": limits["max_num_images"], "seed": 0}


@pytest.mark.parametrize(("model", "target"), [(m, t) for m in sorted(DIFFUSION) for t in targets(m)])
def test_budget_follows_the_measured_speed(tmp_path, model, target):
    """The budget is responseTimeout x timeout_margin at the speed the worker measured; no target
    states a speed of its own. At a speed slow enough that the worst request is over budget (a
    slow board, a busy machine), it is refused with 400, and the same request streamed, whose
    limit is one step, is accepted."""
    cfg = config(model, target)
    assert 0 < cfg["handler"]["timeout_margin"] <= 0.8
    assert not {"image_steps_per_second", "steps_per_second_512"} & set(cfg["handler"])
    handler, ctx = load_handler(DIFFUSION[model], model, unpack(tmp_path, model, demo_weights(model), target), target)
    allowed_s = cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
    assert handler.model.budget.units == pytest.approx(allowed_s / handler.model.budget.clock.seconds_per_unit)
    worst = worst_request(model, handler.model.request.limits)
    worst_req = handler.model.parse(worst)
    streamed = handler.model.parse({**worst, "stream": True})
    # A clock at which the whole request needs twice the allowed time but one step fits easily.
    handler.model.budget.clock = StepClock(2 * allowed_s / worst_req.cost())
    assert streamed.step_cost() * 10 < handler.model.budget.units < worst_req.cost()
    with pytest.raises(RequestError, match="response timeout") as refused:
        handler.model.budget.check(worst_req)
    assert "stream" in str(refused.value)  # the 400 says how to get it done
    run_batch(handler, ctx, [{"body": worst}])
    assert ctx.status(0) == 400
    handler.model.budget.check(streamed)


def test_step_clock_follows_a_slower_machine_never_a_faster_batch():
    clock = StepClock(0.1)
    clock.observe(seconds=1.0, units=100)  # a batched group: 0.01 s per unit
    assert clock.seconds_per_unit == 0.1  # the batch-1 warm-up figure stays the floor
    for _ in range(10):
        clock.observe(seconds=50.0, units=100)  # the machine got 5x slower
    assert clock.seconds_per_unit == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("target", targets("cam"))
def test_cam_full_batch_fits_the_timeout(target):
    """cam states a worst-case speed (images at its pixel limit per second): a full batch of
    them, decoded and classified, fits responseTimeout x margin."""
    cfg = config("cam", target)
    rate = cfg["handler"]["max_size_images_per_second"]
    assert cfg["batchSize"] / rate <= cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
