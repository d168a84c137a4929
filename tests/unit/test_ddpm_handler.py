"""The ddpm handler in-process: scheduler math against the DDPM paper, seeded determinism alone
vs. in a batch, mixed-parameter batches, trajectories, bad input."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from handlers.core.budget import StepClock
from handlers.core.torchscript import FrozenUNet
from handlers.ddpm.handler import DdpmHandler
from handlers.ddpm.request import SCHEDULERS
from harness.bad_inputs import ddpm_cases
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, unpack
from harness.traffic import without_ids


def tiny_pipeline(path, channels=1, size=16, schedule="linear"):
    """A small random DDPM pipeline in diffusers layout (the layout of every DDPM repo)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    return load_handler(DdpmHandler, "ddpm", unpack(root / "model", "ddpm", tiny_pipeline(root / "weights")))


def images_of(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))), dtype=int) for b in json.loads(out)["images"]]


def test_forward_process_matches_closed_form():
    sched = DDPMScheduler.from_pretrained(demo_weights("ddpm"), subfolder="scheduler")
    betas = torch.tensor(sched.config.trained_betas) if sched.config.trained_betas else sched.betas
    abar = torch.cumprod(1 - betas.double(), 0)
    x0, eps = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for t in (0, 10, 500, 999):
        expected = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        got = sched.add_noise(x0.float(), eps.float(), torch.tensor([t]))
        assert torch.allclose(got.double(), expected, atol=1e-5), t


@pytest.mark.parametrize("variance_type", ["archive", "fixed_large"])
@pytest.mark.parametrize("t", [999, 500, 20, 1])
def test_one_ddpm_step_matches_ho_et_al_eq_11(t, variance_type):
    sched = DDPMScheduler.from_pretrained(demo_weights("ddpm"), subfolder="scheduler")
    if variance_type != "archive":  # google/ddpm-cifar10-32 and others use sigma_t^2 = beta_t
        sched = DDPMScheduler.from_config(sched.config, variance_type=variance_type)
    sched.set_timesteps(1000)
    betas = sched.betas.double()
    alphas, abar = 1 - betas, torch.cumprod(1 - betas, 0)
    # x_t built from an x0 inside [-1, 1], so the scheduler's x0 clipping changes nothing.
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 1.8 - 0.9
    eps = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    got = sched.step(eps.float(), t, xt.float(), generator=torch.Generator().manual_seed(7)).prev_sample.double()
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7)).double()
    # eq. 11; sigma_t^2 is the posterior variance (eq. 7) for "fixed_small", beta_t for "fixed_large".
    sigma2 = {"fixed_small": (1 - abar[t - 1]) / (1 - abar[t]) * betas[t], "fixed_large": betas[t]}[
        sched.config.variance_type]
    mean = (xt - betas[t] / (1 - abar[t]).sqrt() * eps) / alphas[t].sqrt()
    assert torch.allclose(got, mean + sigma2.sqrt() * z, atol=1e-4)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_seeded_request_same_alone_and_in_batch(tiny, scheduler):
    handler, ctx = tiny
    req = {"body": {"steps": 6, "seed": 123, "num_images": 2, "scheduler": scheduler}}
    (alone,) = run_batch(handler, ctx, [req])
    batch = run_batch(handler, ctx, [{"body": {"steps": 6, "seed": 5, "scheduler": scheduler}}, req,
                                     {"body": {"steps": 6, "seed": 9, "scheduler": scheduler}}])
    assert all(ctx.status(i) == 200 for i in range(3))
    assert ctx.get_response_headers(1)["X-Batch-Size"] == "3"
    for a, b in zip(images_of(alone), images_of(batch[1])):
        assert np.abs(a - b).max() <= 1
    assert json.loads(alone)["seed"] == 123
    assert not np.array_equal(images_of(batch[0])[0], images_of(batch[2])[0])  # seeds matter


def test_ddpm_scheduler_with_noise_is_reproducible(tiny):
    handler, ctx = tiny
    req = {"body": {"steps": 5, "seed": 3, "scheduler": "ddpm"}}
    a = images_of(run_batch(handler, ctx, [req])[0])[0]
    b = images_of(run_batch(handler, ctx, [{"body": {"steps": 5, "seed": 4, "scheduler": "ddpm"}}, req])[1])[0]
    assert np.abs(a - b).max() <= 1


def test_mixed_parameter_batch(tiny):
    handler, ctx = tiny
    reqs = [{"body": {"steps": 3, "seed": 1}}, {"body": {"steps": 7, "seed": 2, "scheduler": "ddpm"}},
            {"body": {"steps": 4, "seed": 3, "scheduler": "ddim", "eta": 1.0, "num_images": 3}}, {"body": {"steps": 3, "seed": 4}}]
    batch = run_batch(handler, ctx, reqs)
    assert [ctx.status(i) for i in range(len(reqs))] == [200] * len(reqs)
    for i, req in enumerate(reqs):
        (single,) = run_batch(handler, ctx, [req])
        got, want = json.loads(batch[i]), json.loads(single)
        assert (got["steps"], got["scheduler"], got["seed"]) == (want["steps"], want["scheduler"], want["seed"])
        for a, b in zip(images_of(batch[i]), images_of(single)):
            assert np.abs(a - b).max() <= 1
    assert len(json.loads(batch[2])["images"]) == 3 and json.loads(batch[2])["eta"] == 1.0


def test_trajectory_and_png(tiny):
    handler, ctx = tiny
    traj, png = run_batch(handler, ctx, [{"body": {"steps": 12, "seed": 0, "trajectory": True}},
                                          {"body": {"steps": 3, "seed": 0}}], headers=[{}, {"Accept": "image/png"}])
    gif = Image.open(io.BytesIO(base64.b64decode(json.loads(traj)["trajectory"])))
    assert gif.format == "GIF" and gif.n_frames >= 5
    assert ctx.get_response_content_type(1) == "image/png"
    assert Image.open(io.BytesIO(png)).size == (16, 16)


@pytest.mark.parametrize("case", ddpm_cases(), ids=lambda c: c[0])
def test_bad_input_fails_alone(tiny, case):
    handler, ctx = tiny
    _, payload, field = case
    good = {"body": {"steps": 2, "seed": 0}}
    outs = run_batch(handler, ctx, [good, {"body": payload}, good])
    assert ctx.status(1) == 400, outs[1]
    assert json.loads(outs[1])["field"] == field
    assert ctx.status(0) == ctx.status(2) == 200 and without_ids(outs[0]) == without_ids(outs[2])


def test_batch_over_budget_sheds_with_503(tiny):
    handler, ctx = tiny
    budget = handler.model.budget
    measured = budget.clock
    budget.clock = StepClock(budget.timeout_s * budget.margin / 10)  # 10 image-steps per batch:
    try:  # two 5-step requests fit, the third does not
        outs = run_batch(handler, ctx, [{"body": {"steps": 5, "seed": i}} for i in range(3)])
        assert [ctx.status(i) for i in range(3)] == [200, 200, 503]
        assert "retry" in json.loads(outs[2])["error"]
    finally:
        budget.clock = measured


@pytest.mark.parametrize("channels, size, mode", [(3, 32, "RGB"), (1, (16, 24), "L")], ids=["cifar-like", "non-square"])
def test_pretrained_layout(tmp_path, channels, size, mode):
    """Any diffusers DDPM directory through the same loader: 3-channel 32x32 like
    google/ddpm-cifar10-32, and a (height, width) sample_size."""
    wdir = tiny_pipeline(tmp_path / "pipeline", channels=channels, size=size)
    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(tmp_path / "model", "ddpm", wdir))
    (out,) = run_batch(handler, ctx, [{"body": {"steps": 2, "seed": 0}}])
    img = Image.open(io.BytesIO(base64.b64decode(json.loads(out)["images"][0])))
    height, width = (size, size) if isinstance(size, int) else size
    assert img.size == (width, height) and img.mode == mode


def test_demo_model_seed_holds_over_default_steps(ddpm_handler):
    """The real demo model over 50 steps with noise at every step (DDPM, DDIM eta=1): a seeded
    request is unchanged inside a batch, where small numeric differences would have compounded."""
    handler, ctx = ddpm_handler
    for extra in ({"scheduler": "ddpm"}, {"scheduler": "ddim", "eta": 1.0}):
        req = {"body": {"steps": 50, "seed": 11, "num_images": 2, **extra}}
        (alone,) = run_batch(handler, ctx, [req])
        batch = run_batch(handler, ctx, [{"body": {"steps": 50, "seed": s, **extra}} for s in range(3)] + [req])
        for a, b in zip(images_of(alone), images_of(batch[3])):
            assert np.abs(a - b).max() <= 1, extra


def test_torchscript_unet_gives_the_eager_images(ddpm_handler, tmp_path):
    """cpu.yaml's `torchscript: true` (handlers/torchscript.py) changes speed, not answers: in
    float32 the frozen graph's noise predictions equal the eager UNet's at any batch size (64+
    takes the traced branch of a layout-only `if`), and the demo model's seeded 50-step requests
    come out the same with the knob off, for every scheduler. (cpu.yaml's bfloat16 UNet rounds
    each differently: test_bfloat16_unet_images_stay_near_float32's.)"""
    assert isinstance(ddpm_handler[0].model.denoise, FrozenUNet)  # the shipped cpu config turns it on
    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(tmp_path / "frozen", "ddpm", demo_weights("ddpm"),
                                                            handler_overrides={"unet_dtype_cpu": None}))
    eager, eager_ctx = load_handler(DdpmHandler, "ddpm", unpack(tmp_path / "eager", "ddpm", demo_weights("ddpm"),
                                                                handler_overrides={"unet_dtype_cpu": None,
                                                                                   "torchscript": False}))
    assert isinstance(handler.model.denoise, FrozenUNet) and not isinstance(eager.model.denoise, FrozenUNet)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in (1, 3, 70):
            x = torch.randn((batch, *handler.model.shape), generator=gen)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            assert torch.allclose(handler.model.denoise(x, t), eager.model.denoise(x, t), atol=1e-5), batch
            assert torch.allclose(handler.model.denoise(x, t[0]), eager.model.denoise(x, t[0]), atol=1e-5), batch  # scalar t
    for scheduler in SCHEDULERS:
        req = [{"body": {"steps": 50, "seed": 5, "num_images": 2, "scheduler": scheduler}}]
        (frozen,) = run_batch(handler, ctx, req)
        (plain,) = run_batch(eager, eager_ctx, req)
        for a, b in zip(images_of(frozen), images_of(plain)):
            assert np.abs(a - b).max() <= 1, scheduler
