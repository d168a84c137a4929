"""The cam handler in-process (TorchServe's MockContext): CAM correctness, batching, bad input."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from handlers.cam.handler import CamHandler
from handlers.cam.model import normalise_maps, upsample_maps
from harness.bad_inputs import b64, cam_cases
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, png_bytes, unpack
from tests.support import cam_contract
from weights import digits, prepare_cam_pretrained


@pytest.fixture(scope="module")
def heldout():
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    return images[test], labels[test]


def digit_png(image, size=64) -> bytes:
    return png_bytes(digits.to_pil(image, size))


def tensors(handler, images):
    return handler.model.preprocess([digits.to_pil(im, 64) for im in images])[1]


def test_fast_cam_equals_pytorch_grad_cam(cam_handler, heldout):
    handler, _ = cam_handler
    batch = tensors(handler, heldout[0][:12])
    targets = [None] * 6 + [int(t) for t in heldout[1][6:12]]  # predicted and given classes
    _, chosen, coarse = handler.model.fast_cam(batch, targets)
    ours = upsample_maps(coarse, tuple(batch.shape[-2:])).numpy()
    with GradCAM(model=handler.model.net, target_layers=[handler.model.net.layer4]) as gradcam:
        reference = gradcam(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in chosen])
        # The coarse maps too, from the library's own activations and gradients.
        acts = gradcam.activations_and_grads.activations[0].numpy()
        grads = gradcam.activations_and_grads.gradients[0].numpy()
        lib_coarse = torch.from_numpy(gradcam.get_cam_image(batch, handler.model.net.layer4, None, acts, grads, False))
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-4
    assert torch.allclose(normalise_maps(lib_coarse.clamp(min=0)), coarse, atol=1e-4)
    assert coarse.shape[-2:] == (4, 4)  # a map, not a single number


def test_map_is_hot_on_the_ink(cam_handler, heldout):
    handler, _ = cam_handler
    images = heldout[0][:40]
    batch = tensors(handler, images)
    _, _, coarse = handler.model.fast_cam(batch, [None] * len(images))
    maps = upsample_maps(coarse, tuple(batch.shape[-2:]))
    ink = digits.upscale(images, batch.shape[-1])[:, 0] > 0.5
    ink_mean = torch.stack([m[k].mean() for m, k in zip(maps, ink)])
    bg_mean = torch.stack([m[~k].mean() for m, k in zip(maps, ink)])
    # Every digit: the map weighs the strokes more than the empty background.
    assert (ink_mean > bg_mean).float().mean() >= 0.9, (ink_mean, bg_mean)
    assert ink_mean.mean() > 1.3 * bg_mean.mean()


def test_classifies_heldout_digits(cam_handler, heldout):
    handler, ctx = cam_handler
    rows = [{"body": digit_png(im)} for im in heldout[0][:16]]
    outs = [json.loads(o) for o in run_batch(handler, ctx, rows)]
    predicted = [o["predictions"][0]["index"] for o in outs]
    assert np.mean(np.array(predicted) == heldout[1][:16]) >= 0.9
    first = outs[0]
    assert len(first["predictions"]) == 5
    assert first["cam"]["target"] == first["predictions"][0]["index"]
    assert first["cam"]["label"] == str(first["cam"]["target"])
    overlay = Image.open(io.BytesIO(base64.b64decode(first["cam"]["overlay"])))
    assert overlay.size == (128, 128) and overlay.mode == "RGB"
    flat = np.array(first["cam"]["map"])
    assert flat.shape == (4, 4) and flat.min() >= 0 and flat.max() <= 1 and flat.max() > 0.99


def test_batch_equals_single_requests(cam_handler, heldout):
    handler, ctx = cam_handler
    rows = [
        {"body": digit_png(heldout[0][0])},
        {"body": {"image": b64(digit_png(heldout[0][1])), "topk": 3}},
        {"body": {"image": b64(digit_png(heldout[0][2])), "target": 7}},
        {"body": digit_png(heldout[0][3], size=200)},
        {"body": {"image": b64(digit_png(heldout[0][4])), "topk": 10, "target": 0}},
    ]
    batched = [json.loads(o) for o in run_batch(handler, ctx, rows)]
    assert all(ctx.status(i) == 200 for i in range(len(rows)))
    singles = [json.loads(run_batch(handler, ctx, [row])[0]) for row in rows]
    for b, s in zip(batched, singles):
        assert [p["index"] for p in b["predictions"]] == [p["index"] for p in s["predictions"]]
        cam_contract.compare(b, s)  # what a batch may change: tests/support/cam_contract.py
    assert batched[2]["cam"]["target"] == 7 and len(batched[1]["predictions"]) == 3


@pytest.mark.parametrize("case", cam_cases(), ids=lambda c: c[0])
def test_bad_input_fails_alone(cam_handler, heldout, case):
    handler, ctx = cam_handler
    _, payload, field = case
    good = {"body": digit_png(heldout[0][0])}
    outs = run_batch(handler, ctx, [good, {"body": payload}, good])
    assert ctx.status(1) == 400
    body = json.loads(outs[1])
    assert body["field"] == field and body["error"]
    assert ctx.status(0) == ctx.status(2) == 200
    assert json.loads(outs[0]) == json.loads(outs[2])


def test_explain_and_png(cam_handler, heldout):
    handler, ctx = cam_handler
    row = {"body": digit_png(heldout[0][5])}
    explained, png, plain = run_batch(handler, ctx, [row, row, row],
                                      headers=[{"explain": "True"}, {"Accept": "image/png"}, {}])
    explained = json.loads(explained)
    assert set(explained) == {"target", "label", "method", "map"}
    assert ctx.get_response_content_type(1) == "image/png"
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    assert json.loads(plain)["cam"]["map"] == explained["map"]


def test_library_methods_agree_with_fast_path(cam_handler, heldout):
    handler, ctx = cam_handler
    img = b64(digit_png(heldout[0][6]))
    fast, exact, plusplus = (json.loads(o) for o in run_batch(handler, ctx, [
        {"body": {"image": img}},
        {"body": {"image": img, "method": "gradcam-backprop"}},
        {"body": {"image": img, "method": "gradcam++"}},
    ]))
    assert exact["cam"]["target"] == fast["cam"]["target"]
    np.testing.assert_allclose(exact["cam"]["map"], fast["cam"]["map"], atol=1e-4)
    assert plusplus["cam"]["method"] == "gradcam++" and np.array(plusplus["cam"]["map"]).shape == (4, 4)


def test_pretrained_layout_loads_with_imagenet_labels(tmp_path, fake_resnet50_file):
    wdir = tmp_path / "pretrained-cam"
    assert prepare_cam_pretrained.main(["--out", str(wdir), "--weights-file", str(fake_resnet50_file)]) == 0
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", wdir))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    (out,) = run_batch(handler, ctx, [{"body": png_bytes(photo)}])
    result = json.loads(out)
    assert ctx.status(0) == 200
    assert len(result["predictions"]) == 5 and handler.model.labels[0] == "tench"
    assert np.array(result["cam"]["map"]).shape == (7, 7)  # ResNet-50 at 224 px
    overlay = Image.open(io.BytesIO(base64.b64decode(result["cam"]["overlay"])))
    assert overlay.size == (224, 224)


def test_missing_weights_file_is_named(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cam_config.json").write_text((demo_weights("cam") / "cam_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", broken))
    (broken / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match="model.safetensors"):
        load_handler(CamHandler, "cam", unpack(tmp_path / "model2", "cam", broken))
