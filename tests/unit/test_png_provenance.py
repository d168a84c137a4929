"""The PNGs ddpm and sd15 write say how they were made (handlers/core/provenance.py): AUTOMATIC1111's
`parameters` text, read back here with A1111's own parsing rule, and the `serving` JSON record
(the request as resolved, the image's index, the archive's fingerprint, torch, machine), read back
with Pillow; `"metadata": false` writes bare PNGs; the archive's facts come from its archive.json."""
from __future__ import annotations

import base64
import io
import json
import platform
import re

import pytest
import torch
from PIL import Image

from handlers.ddpm.handler import DdpmHandler
from harness.bad_inputs import b64
from harness.context import run_batch
from harness.inprocess import demo_weights, gradient_png, load_handler, unpack

ARCHIVE = {"model": "m", "version": "2.0", "profile": "demo", "target": "cpu", "fingerprint": "f" * 64,
           "weights_sha256": "0123456789abcdef" * 4}
# AUTOMATIC1111's parser of the settings line (modules/infotext_utils.py, re_param)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, settings) as A1111's parse_generation_parameters reads them."""
    *lines, last = text.split("\n")
    negative = [line[len("Negative prompt: "):] for line in lines if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    settings = {k: json.loads(v) if v.startswith('"') else v for k, v in A1111_PARAM.findall(last)}
    return prompt, negative[0] if negative else "", settings


def pngs(out: bytes | str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(s))) for s in json.loads(out)["images"]]


@pytest.fixture
def with_archive(monkeypatch):
    def apply(handler):
        monkeypatch.setattr(handler.model, "archive", dict(ARCHIVE))
        return handler
    return apply


def test_ddpm_pngs_say_how_they_were_made(ddpm_handler, with_archive):
    handler, ctx = ddpm_handler
    with_archive(handler)
    (out,) = run_batch(handler, ctx, [{"body": {"num_images": 2, "steps": 3, "seed": 11, "scheduler": "ddim"}}])
    images = pngs(out)
    for index, img in enumerate(images):
        prompt, negative, settings = parse_a1111(img.text["parameters"])
        assert (prompt, negative) == ("", "")
        shape = handler.model.shape
        assert settings == {"Steps": "3", "Sampler": "DDIM", "Eta": "0.0", "Seed": "11",
                            "Size": f"{shape[2]}x{shape[1]}", "Model hash": "0123456789", "Model": "m"}
        record = json.loads(img.text["serving"])
        assert record == {"request": {"num_images": 2, "seed": 11, "deadline_s": None, "metadata": True, "steps": 3,
                                      "scheduler": "ddim", "eta": 0.0, "trajectory": False},
                          "image_index": index, **ARCHIVE, "torch": torch.__version__, "machine": platform.machine()}


def test_a_random_seed_is_recorded_as_used(ddpm_handler, with_archive):
    handler, ctx = ddpm_handler
    with_archive(handler)
    (out,) = run_batch(handler, ctx, [{"body": {"steps": 2}}])
    (img,) = pngs(out)
    assert json.loads(img.text["serving"])["request"]["seed"] == json.loads(out)["seed"]


def test_the_raw_png_answer_carries_it_too(ddpm_handler, with_archive):
    handler, ctx = ddpm_handler
    with_archive(handler)
    (out,) = run_batch(handler, ctx, [{"body": {"steps": 2, "seed": 3}}], headers=[{"Accept": "image/png"}])
    img = Image.open(io.BytesIO(out))
    assert json.loads(img.text["serving"])["request"]["seed"] == 3
    assert "Seed: 3" in img.text["parameters"]


@pytest.mark.parametrize("model", ["ddpm", "sd15"])
def test_metadata_false_writes_bare_pngs(ddpm_handler, sd15_handler, model):
    handler, ctx = {"ddpm": ddpm_handler, "sd15": sd15_handler}[model]
    body = {"steps": 2, "seed": 1, "metadata": False}
    if model == "sd15":
        body.update(prompt="a red digit", width=64, height=64)
    (out,) = run_batch(handler, ctx, [{"body": body}])
    (img,) = pngs(out)
    assert img.text == {}
    same = {**body, "metadata": True}
    (out2,) = run_batch(handler, ctx, [{"body": same}])
    (img2,) = pngs(out2)
    assert set(img2.text) == {"parameters", "serving"}
    assert img.tobytes() == img2.tobytes()  # the metadata changes no pixel


def test_sd15_pngs_in_a1111_format(sd15_handler, with_archive):
    handler, ctx = sd15_handler
    with_archive(handler)
    body = {"prompt": "a red 3, drawn: big", "negative_prompt": "blur", "steps": 4, "seed": 5, "width": 64,
            "height": 64, "scheduler": "dpm++", "guidance_scale": 6.0, "image": b64(gradient_png(64)),
            "strength": 0.5}
    (out,) = run_batch(handler, ctx, [{"body": body}])
    (img,) = pngs(out)
    prompt, negative, settings = parse_a1111(img.text["parameters"])
    assert (prompt, negative) == ("a red 3, drawn: big", "blur")
    assert settings == {"Steps": "4", "Sampler": "DPM++ 2M", "CFG scale": "6.0", "Seed": "5", "Size": "64x64",
                        "Model hash": "0123456789", "Model": "m", "Denoising strength": "0.5"}
    record = json.loads(img.text["serving"])
    assert record["request"]["image"] == body["image"] and record["request"]["prompt"] == body["prompt"]
    assert "stream" not in record["request"] and "preview_every" not in record["request"]


def test_the_archive_facts_come_from_archive_json(tmp_path):
    model_dir = unpack(tmp_path / "ddpm", "ddpm", demo_weights("ddpm"))
    (model_dir / "archive.json").write_text(json.dumps({k: ARCHIVE[k] for k in
                                                        ("profile", "target", "version", "fingerprint", "weights_sha256")}))
    handler, ctx = load_handler(DdpmHandler, "ddpm", model_dir)
    assert {k: handler.model.archive[k] for k in ("profile", "target", "fingerprint", "weights_sha256")} == \
        {k: ARCHIVE[k] for k in ("profile", "target", "fingerprint", "weights_sha256")}
    assert handler.model.archive["model"] == "ddpm"
