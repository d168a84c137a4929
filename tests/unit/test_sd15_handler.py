"""The sd15 handler in-process on the demo pipeline: seeds, batching, img2img, inpainting,
one set of components, prompt truncation, the time budget, bad input."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.core.budget import StepClock
from handlers.core.errors import RequestError
from harness.bad_inputs import b64, sd15_cases
from harness.context import run_batch
from harness.inprocess import gradient_png, pixels, png_bytes
from harness.traffic import without_ids

BASE = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64}


pytestmark = pytest.mark.usefixtures("sd15_handler", "one_torch_thread")  # handler first: it sets 2 threads


def centre_mask(size=64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255  # repaint the centre only
    return mask


def test_one_set_of_components(sd15_handler):
    handler, _ = sd15_handler
    base = handler.model.pipes["txt2img"]
    for mode in ("img2img", "inpaint"):
        pipe = handler.model.pipes[mode]
        assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.text_encoder is base.text_encoder
        assert pipe.tokenizer is base.tokenizer


def test_no_empty_float32_list_warning_from_diffusers(sd15_handler, caplog):
    """diffusers warns "should be kept in float32: []" on every dtype cast, with nothing to keep:
    the handler drops that one message; a list that names modules still gets through."""
    handler, _ = sd15_handler
    vae = handler.model.pipes["txt2img"].vae
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        vae.to(torch.float32)
        assert "should be kept in float32" not in caplog.text
        vae._keep_in_fp32_modules = ["decoder"]
        try:
            vae.to(torch.float32)
        finally:
            del vae._keep_in_fp32_modules  # back to the class attribute
    assert "should be kept in float32: ['decoder']" in caplog.text


def test_same_seed_same_png(sd15_handler):
    handler, ctx = sd15_handler
    req = {"body": {**BASE, "seed": 11}}
    a, b, c = run_batch(handler, ctx, [req, req, {"body": {**BASE, "seed": 12}}])
    assert json.loads(a)["images"] == json.loads(b)["images"]
    assert json.loads(a)["images"] != json.loads(c)["images"]
    body = json.loads(a)
    assert body["seed"] == 11 and body["mode"] == "txt2img" and body["width"] == 64
    assert any("smoke-test" in w for w in body["warnings"])


def test_batch_of_four_equals_four_single_calls(sd15_handler):
    handler, ctx = sd15_handler
    reqs = [{"body": {**BASE, "seed": s, "prompt": p}} for s, p in
            [(1, "a cat"), (2, "a dog"), (3, "a tree"), (4, "a boat")]]
    reqs[2]["body"]["num_images"] = 2
    batched = run_batch(handler, ctx, reqs)
    assert [ctx.status(i) for i in range(4)] == [200] * 4
    assert ctx.get_response_headers(0)["X-Batch-Size"] == "4"
    for req, out in zip(reqs, batched):
        (single,) = run_batch(handler, ctx, [req])
        for a, b in zip(json.loads(out)["images"], json.loads(single)["images"]):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert len(json.loads(batched[2])["images"]) == 2


def test_mixed_batch_runs_in_groups_each_like_a_single_call(sd15_handler, monkeypatch):
    """Modes and schedulers mixed in one batch: one pipeline call per group (each with a fresh
    scheduler), and every request gets what it gets alone, batched img2img/inpainting included."""
    handler, ctx = sd15_handler
    src, mask = b64(gradient_png()), b64(png_bytes(Image.fromarray(centre_mask())))
    img2img = {"prompt": "x", "steps": 4, "image": src, "strength": 0.5}
    inpaint = {"prompt": "y", "steps": 4, "image": src, "mask": mask}
    reqs = [{**BASE, "seed": 5, "scheduler": "ddim"}, {**img2img, "seed": 6}, {**inpaint, "seed": 7},
            {**BASE, "seed": 8, "scheduler": "euler", "steps": 2}, {**img2img, "prompt": "z", "seed": 9},
            {**inpaint, "seed": 10, "num_images": 2}, {**BASE, "seed": 5, "scheduler": "dpm++"}]
    sizes = []
    run_group = handler.model.run_group
    monkeypatch.setattr(handler.model, "run_group", lambda group, progress: sizes.append(len(group.requests)) or run_group(group, progress))
    batched = run_batch(handler, ctx, [{"body": r} for r in reqs])
    assert [ctx.status(i) for i in range(len(reqs))] == [200] * len(reqs)
    assert sizes == [1, 2, 2, 1, 1]
    for req, out in zip(reqs, batched):
        (single,) = run_batch(handler, ctx, [{"body": req}])
        for a, b in zip(json.loads(out)["images"], json.loads(single)["images"], strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1, req


def test_every_scheduler_runs(sd15_handler):
    handler, ctx = sd15_handler
    reqs = [{"body": {**BASE, "seed": 0, "scheduler": s}} for s in ("pndm", "ddim", "euler", "dpm++")]
    outs = run_batch(handler, ctx, reqs)
    assert [ctx.status(i) for i in range(4)] == [200] * 4
    assert [json.loads(o)["scheduler"] for o in outs] == ["pndm", "ddim", "euler", "dpm++"]


def test_accept_png(sd15_handler):
    handler, ctx = sd15_handler
    (png,) = run_batch(handler, ctx, [{"body": {**BASE, "seed": 1}}], headers=[{"Accept": "image/png"}])
    assert ctx.get_response_content_type(0) == "image/png"
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    headers = ctx.get_response_headers(0)
    assert headers["X-Seed"] == "1" and "smoke-test" in headers["X-Warnings"]


def test_img2img_and_size_from_image(sd15_handler):
    handler, ctx = sd15_handler
    src = gradient_png(64)
    (out,) = run_batch(handler, ctx, [{"body": {"prompt": "x", "steps": 4, "image": b64(src), "strength": 0.5, "seed": 0}}])
    body = json.loads(out)
    assert ctx.status(0) == 200 and body["mode"] == "img2img" and body["strength"] == 0.5
    assert (body["width"], body["height"]) == (64, 64)


def test_inpainting_keeps_pixels_outside_the_mask(sd15_handler):
    handler, ctx = sd15_handler
    src, mask = gradient_png(64), centre_mask(64)
    (out,) = run_batch(handler, ctx, [{"body": {"prompt": "x", "steps": 4, "image": b64(src), "mask": b64(png_bytes(Image.fromarray(mask))),
                                                "seed": 0}}])
    body = json.loads(out)
    assert ctx.status(0) == 200 and body["mode"] == "inpaint"
    result = pixels(body["images"][0])
    original = np.asarray(Image.open(io.BytesIO(src)), dtype=int)
    # Reference tolerance: what the VAE alone does to this image (encode -> decode round trip).
    pipe = handler.model.pipes["txt2img"]
    with torch.inference_mode():
        x = torch.from_numpy(original.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        rt = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    roundtrip = ((rt[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)
    outside = mask == 0
    outside[12:52, 12:52] = False  # the latent grid is 8x coarser: leave a margin around the mask
    err = np.abs(result - original)[outside].mean()
    vae_err = np.abs(roundtrip - original)[outside].mean()
    assert err <= vae_err + 2, (err, vae_err)
    inside_change = np.abs(result - original)[mask > 0].mean()
    assert inside_change > err  # the masked part was really repainted


def test_long_prompt_is_truncated_with_a_warning(sd15_handler):
    handler, ctx = sd15_handler
    (out,) = run_batch(handler, ctx, [{"body": {**BASE, "prompt": "a very long prompt " * 40, "seed": 0}}])
    assert ctx.status(0) == 200
    assert any("truncated" in w and "'prompt'" in w for w in json.loads(out)["warnings"])


@pytest.mark.parametrize(("n", "steps", "size", "fits"), [
    (1, 70, 512, True), (1, 71, 512, False), (2, 25, 512, True), (1, 25, 768, True),
    (1, 11, 1024, True), (1, 12, 1024, False), (4, 50, 256, True),
])
def test_cpu_budget_is_what_the_config_says(sd15_handler, n, steps, size, fits):
    """model_configs/sd15/cpu.yaml lists what fits its budget when the worker measures the real
    SD1.5's 0.115 steps/s; a 1024x1024 step costs 5.8 units (attention is quadratic), not 4, and
    every image adds a VAE decode."""
    handler, ctx = sd15_handler
    measured = handler.model.budget.clock
    handler.model.budget.clock = StepClock(1 / 0.115)
    try:
        body = {"prompt": "x", "steps": steps, "width": size, "height": size, "num_images": n}
        req = handler.model.parse(body)
        assert (req.cost() <= handler.model.budget.units) == fits
        if not fits:
            with pytest.raises(RequestError, match="response timeout"):
                handler.model.budget.check(req)
    finally:
        handler.model.budget.clock = measured


def test_img2img_cost_counts_only_the_steps_it_runs(sd15_handler):
    handler, _ = sd15_handler
    src = b64(gradient_png(64))
    cost = {s: handler.model.parse({"prompt": "x", "steps": 10, "image": src, "strength": s}).cost()
            for s in (0.3, 0.35, 1.0)}
    assert cost[0.3] == cost[0.35] < cost[1.0]  # int(10 x 0.35) = 3 steps, like diffusers


@pytest.mark.parametrize("case", sd15_cases(), ids=lambda c: c[0])
def test_bad_input_gets_400_naming_the_field(sd15_handler, case):
    handler, ctx = sd15_handler
    _, payload, field = case
    (out,) = run_batch(handler, ctx, [{"body": payload}])
    assert ctx.status(0) == 400, out
    assert json.loads(out)["field"] == field


def test_bad_inputs_fail_alone_in_a_mixed_batch(sd15_handler):
    handler, ctx = sd15_handler
    cases = sd15_cases()
    good = {"body": {**BASE, "steps": 2, "seed": 0}}
    outs = run_batch(handler, ctx, [good, *({"body": payload} for _, payload, _ in cases), good])
    assert [ctx.status(i) for i in range(1, len(cases) + 1)] == [400] * len(cases)
    assert [json.loads(o)["field"] for o in outs[1:-1]] == [field for _, _, field in cases]
    assert ctx.status(0) == ctx.status(len(cases) + 1) == 200 and without_ids(outs[0]) == without_ids(outs[-1])


def test_flagged_images_are_reported_not_blacked_out(sd15_handler):
    """A real (tiny, random) diffusers safety checker, tuned so it flags everything."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    handler, ctx = sd15_handler
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                     "num_hidden_layers": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 4},
                        projection_dim=32)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)  # every cosine similarity is above threshold
    pipe = handler.model.pipes["txt2img"]
    saved = handler.model.safety_checker, pipe.feature_extractor
    handler.model.safety_checker, pipe.feature_extractor = checker, CLIPImageProcessor(size=32, crop_size=32)
    try:
        (out,) = run_batch(handler, ctx, [{"body": {**BASE, "seed": 0, "num_images": 2}}])
    finally:
        handler.model.safety_checker, pipe.feature_extractor = saved
    body = json.loads(out)
    assert ctx.status(0) == 200
    assert body["nsfw"] == [True, True] and body["images"] == [None, None]
    assert any("flagged" in w for w in body["warnings"])


def test_image_and_mask_as_people_send_them(sd15_handler):
    """sd15's `image` and `mask` sent as an EXIF-rotated PNG, a 16-bit PNG and with transparency
    give the same seeded inpainting as the plain 8-bit PNGs (transparent image pixels are white,
    transparent mask pixels are 'keep')."""
    from tests.unit.test_images import STORE, png16

    handler, ctx = sd15_handler
    rng = np.random.default_rng(0)
    grey = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    grey[:16, :16] = 255  # a white corner: where the RGBA variant is transparent
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    plain_image, plain_mask = Image.fromarray(grey, "L").convert("RGB"), Image.fromarray(mask, "L")

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    plain_image.transpose(STORE[6]).save(rotated, format="PNG", exif=exif)
    sixteen = png16(grey.astype(np.uint16) * 257, color_type=0)
    rgba = np.dstack([np.asarray(plain_image), np.full((64, 64), 255, np.uint8)])
    rgba[:16, :16] = np.dstack([rng.integers(0, 255, (16, 16, 3)), np.zeros((16, 16))]).astype(np.uint8)
    mask_rgba = np.zeros((64, 64, 4), np.uint8)
    mask_rgba[..., :3] = rng.integers(0, 255, (64, 64, 3))  # any colour where transparent
    mask_rgba[20:44, 20:44] = 255

    def inpaint(image: bytes, mask_png: bytes) -> np.ndarray:
        body = {"prompt": "x", "steps": 2, "seed": 3, "image": b64(image), "mask": b64(mask_png)}
        (out,) = run_batch(handler, ctx, [{"body": body}])
        assert ctx.status(0) == 200, out
        return pixels(json.loads(out)["images"][0])

    expected = inpaint(png_bytes(plain_image), png_bytes(plain_mask))
    for image, mask_png in ((rotated.getvalue(), png_bytes(plain_mask)), (sixteen, png_bytes(plain_mask)),
                            (png_bytes(Image.fromarray(rgba, "RGBA")), png_bytes(Image.fromarray(mask_rgba, "RGBA")))):
        assert np.array_equal(inpaint(image, mask_png), expected)
