"""Every model x every target config (model_configs/<model>/<target>.yaml), loaded in-process on
this CPU in the dtype the target runs: `dtype_gpu` for a gpu config (float16 kernels run on the
CPU, slowly, so dtype bugs show here as they would on a GPU), `dtype_cpu` otherwise.

Each checks: every module of the loaded model in that dtype; one ordinary request; a batch of two
seeds (or two images), each within 1/255 of its run alone; a streaming request with previews
(diffusion models); img2img and inpainting (sd15). A continuous-batching target is driven as
TorchServe's worker drives it (harness/continuous.py). No speed is asserted.
"""
from __future__ import annotations

import base64
import json
import uuid

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from PIL import Image

import handlers.adapter.torchserve as adapter
from deploy.targets import config_path, models, targets
from handlers.cam.handler import CamHandler
from handlers.core.model import configured_dtype
from handlers.core.precision import unet_dtype
from handlers.ddpm.handler import DdpmHandler
from handlers.sd15.handler import Sd15Handler
from harness.context import run_batch
from harness.continuous import ContinuousWorker
from harness.inprocess import demo_weights, gradient_png, load_handler, pixels, png_bytes, unpack
from harness.loras import random_lora
from tests.support import cam_contract
from weights import digits

WEIGHTS = {"cam": "cam", "ddpm": "ddpm", "sd15": "sd15-smoke"}
HANDLERS = {"cam": CamHandler, "ddpm": DdpmHandler, "sd15": Sd15Handler}
CASES = [(m, t) for m in models() for t in targets(m)]
STEPPED = [c for c in CASES if c[0] != "cam"]  # cam answers in one message: nothing to stream
SD15 = [c for c in CASES if c[0] == "sd15"]


def over(cases):
    return pytest.mark.parametrize("loaded", cases, indirect=True, ids=[f"{m}-{t}" for m, t in cases])
SD_BASE = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64}
DDPM_BASE = {"steps": 4, "scheduler": "ddim"}


def target_dtype(model: str, target: str) -> torch.dtype:
    cfg = yaml.safe_load(config_path(model, target).read_text())
    return configured_dtype(cfg.get("handler") or {}, cuda=cfg.get("deviceType") == "gpu")


def module_dtype(model: str, target: str, name: str) -> torch.dtype:
    """The dtype the target runs module `name` in: a UNet in `unet_dtype_cpu` on a CPU target
    that sets it (handlers/core/precision.py), everything else in the target's dtype."""
    cfg = yaml.safe_load(config_path(model, target).read_text())
    device = torch.device("cuda" if cfg.get("deviceType") == "gpu" else "cpu")
    want = target_dtype(model, target)
    return unet_dtype(cfg.get("handler") or {}, device, want) if name.split(".")[-1] == "unet" else want


@pytest.fixture(scope="module")
def loaded(request, tmp_path_factory):
    """(model, target, handler, ctx): the handler on the CPU with the target's yaml, `dtype_cpu`
    set to the dtype the target runs."""
    model, target = request.param
    dtype = str(target_dtype(model, target)).removeprefix("torch.")
    tmp = tmp_path_factory.mktemp(f"{model}-{target}")
    overrides = {"dtype_cpu": dtype}
    if model == "sd15":  # a LoRA folder with one random LoRA (float32 file, loaded in the target's dtype)
        random_lora(demo_weights(WEIGHTS[model]), tmp / "loras" / "random.safetensors", seed=0, text_encoder=True)
        overrides["lora_dir"] = str(tmp / "loras")
    model_dir = unpack(tmp / "model", model, demo_weights(WEIGHTS[model]), target, handler_overrides=overrides)
    threads = torch.get_num_threads()
    handler, ctx = load_handler(HANDLERS[model], model, model_dir, target)
    torch.set_num_threads(1)  # the configs' thread counts are for real models; these are tiny
    if handler.step_loop is not None:
        handler.model.step_slice_s = 0.0  # one step per call, whatever the machine's speed
    yield model, target, handler, ctx
    torch.set_num_threads(threads)


def modules_of(served) -> list[tuple[str, torch.nn.Module]]:
    """Every torch module the served model holds, directly or in a diffusers pipeline."""
    found = []
    for name, value in vars(served).items():
        values = value.items() if isinstance(value, dict) else [(name, value)]
        for key, v in values:
            if isinstance(v, torch.nn.Module):
                found.append((key, v))
            elif isinstance(v, DiffusionPipeline):
                found += [(f"{key}.{n}", c) for n, c in v.components.items() if isinstance(c, torch.nn.Module)]
    return found


def assert_real_image(b64_png: str) -> np.ndarray:
    px = pixels(b64_png)
    assert px.std() > 0, "a constant image (NaN or overflow upstream)"
    return px


def ask(handler, ctx, bodies: list) -> list[dict]:
    """One batch of JSON bodies -> the JSON answers (each 200); a continuous-batching target runs
    them through the worker's loop."""
    if handler.step_loop is not None:
        worker = ContinuousWorker(handler, ctx, batch_size=len(bodies))
        for i, body in enumerate(bodies):
            worker.submit(str(i), body)
        worker.drain()
        answers = [worker.answers[str(i)] for i in range(len(bodies))]
        assert [a.status for a in answers] == [200] * len(bodies)
        return [json.loads(a.body) for a in answers]
    ctx.request_ids = None
    outs = run_batch(handler, ctx, [{"body": b} for b in bodies])
    assert [ctx.status(i) for i in range(len(bodies))] == [200] * len(bodies), outs
    return [json.loads(o) for o in outs]


def stream(handler, ctx, body: dict, monkeypatch) -> list[dict]:
    """The NDJSON events of one streaming request: the intermediate messages TorchServe would
    send (recorded where the adapter hands them to ts) and the last one."""
    if handler.step_loop is not None:
        worker = ContinuousWorker(handler, ctx, batch_size=1)
        worker.submit("s", body)
        worker.drain()
        assert worker.answers["s"].status == 200
        text = worker.answers["s"].body.decode()
    else:
        sent = []
        monkeypatch.setattr(adapter, "send_intermediate_predict_response",
                            lambda ret, ids, *_a, **_k: sent.append(ret[0]))
        ctx.new_batch([{}])
        ctx.request_ids = {0: "s"}
        (last,) = handler.handle([{"body": body}], ctx)
        ctx.request_ids = None
        assert ctx.status(0) == 200
        text = b"".join(c if isinstance(c, bytes) else c.encode() for c in [*sent, last]).decode()
    return [json.loads(line) for line in text.splitlines() if line]


@over(CASES)
def test_modules_run_in_the_targets_dtype(loaded):
    model, target, handler, _ = loaded
    want = target_dtype(model, target)
    assert handler.model.dtype == want
    found = modules_of(handler.model)
    assert found, "no torch module found on the served model"
    for name, module in found:
        dtypes = {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers() if b.is_floating_point()}
        runs = module_dtype(model, target, name)
        assert dtypes <= {runs}, f"{model}/{target}: {name} holds {dtypes}, the target runs it in {runs}"


@over(CASES)
def test_ordinary_request_and_a_batch_of_two(loaded):
    model, _, handler, ctx = loaded
    if model == "cam":
        images, _ = digits.load_arrays()
        bodies = [{"image": base64.b64encode(png_bytes(digits.to_pil(im, 64))).decode(), "topk": 3}
                  for im in images[:2]]
    elif model == "ddpm":
        bodies = [{**DDPM_BASE, "seed": s} for s in (1, 2)]
    else:
        bodies = [{**SD_BASE, "seed": s} for s in (1, 2)]
    both = ask(handler, ctx, bodies)
    for body, together in zip(bodies, both):
        (alone,) = ask(handler, ctx, [body])
        if model == "cam":
            probs = [p["probability"] for p in alone["predictions"]]
            assert all(np.isfinite(probs)) and 0 < sum(probs) <= 1.0001
            assert np.isfinite(np.asarray(alone["cam"]["map"])).all()
            assert_real_image(alone["cam"]["overlay"])
            cam_contract.compare(together, alone)  # the cam contract: overlay within one JET level
        else:
            (got,), (want,) = together["images"], alone["images"]
            assert np.abs(assert_real_image(got) - assert_real_image(want)).max() <= 1
    if model != "cam":
        assert both[0]["images"] != both[1]["images"]  # two seeds, two images


@over(STEPPED)
def test_streaming_with_previews(loaded, monkeypatch):
    model, _, handler, ctx = loaded
    base = DDPM_BASE if model == "ddpm" else SD_BASE
    rid = f"matrix-{uuid.uuid4().hex[:12]}"
    events = stream(handler, ctx, {**base, "seed": 5, "stream": True, "preview_every": 2, "request_id": rid}, monkeypatch)
    assert {e["request_id"] for e in events} == {rid} and events[-1]["response"]["request_id"] == rid
    kinds = [e["event"] for e in events]
    assert kinds[0] == "progress" and kinds[-1] == "result", kinds
    assert "preview" in kinds
    total = events[0]["total"]
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(total + 1))
    for e in events:
        if e["event"] == "preview":
            assert all(assert_real_image(img) is not None for img in e["images"])
    (plain,) = ask(handler, ctx, [{**base, "seed": 5}])
    assert np.abs(assert_real_image(events[-1]["response"]["images"][0])
                  - assert_real_image(plain["images"][0])).max() <= 1


@over(SD15)
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_sd15_img2img_and_inpainting(loaded, mode):
    _, _, handler, ctx = loaded
    image = base64.b64encode(gradient_png()).decode()
    body = {**SD_BASE, "image": image, "strength": 0.8, "seed": 3}
    if mode == "inpaint":
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        body["mask"] = base64.b64encode(png_bytes(Image.fromarray(mask))).decode()
    (answer,) = ask(handler, ctx, [body])
    assert answer["mode"] == mode
    px = assert_real_image(answer["images"][0])
    assert px.shape[:2] == (64, 64)


@over(SD15)
def test_sd15_lora_in_the_targets_dtype(loaded):
    """A LoRA request runs in the target's dtype (its layers too) and changes the image; the
    same request without it afterwards is the base model's image again."""
    model, target, handler, ctx = loaded
    body = {**SD_BASE, "seed": 4}
    (base,) = ask(handler, ctx, [body])
    (lora,) = ask(handler, ctx, [{**body, "loras": [{"name": "random"}]}])
    assert np.abs(assert_real_image(lora["images"][0]) - pixels(base["images"][0])).max() > 0
    pipe = handler.model.pipes["txt2img"]
    for name in ("unet", "text_encoder"):
        want = module_dtype(model, target, name)
        lora_dtypes = {p.dtype for n, p in getattr(pipe, name).named_parameters() if ".lora_" in n}
        assert lora_dtypes == {want}, f"{target}: the {name}'s LoRA layers hold {lora_dtypes}, it runs in {want}"
    (again,) = ask(handler, ctx, [body])
    assert np.array_equal(pixels(again["images"][0]), pixels(base["images"][0]))
