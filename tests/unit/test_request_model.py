"""The declared request types: one declaration gives validation, defaults, batching, the
describe API and docs/api/*.schema.json."""
from __future__ import annotations

import json

import pytest
import yaml

from handlers.cam.handler import CamHandler
from handlers.ddpm.handler import DdpmHandler
from handlers.sd15.handler import Sd15Handler
from harness import REPO
from harness.api_docs import DOCS, schema_text
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, png_bytes, unpack
from weights import digits

HANDLERS = {"cam": CamHandler, "ddpm": DdpmHandler, "sd15": Sd15Handler}


@pytest.fixture
def handlers(cam_handler, ddpm_handler, sd15_handler):
    return {"cam": cam_handler, "ddpm": ddpm_handler, "sd15": sd15_handler}


@pytest.mark.parametrize("model", sorted(HANDLERS))
def test_docs_schema_is_generated_from_the_types(handlers, model):
    handler, _ = handlers[model]
    committed = (DOCS / f"{model}.schema.json").read_text()
    assert committed == schema_text(handler), "run: python -m harness.api_docs"


@pytest.mark.parametrize("model", sorted(HANDLERS))
def test_describe_reports_schema_limits_and_capabilities(handlers, model):
    """What `GET /models/<m>?customized=true` answers, through BaseHandler.handle's describe path."""
    handler, ctx = handlers[model]
    (out,) = run_batch(handler, ctx, [{}], headers=[{"describe": "True"}])
    desc = json.loads(out)
    schema = desc["request_schema"]
    cfg = yaml.safe_load((REPO / "model_configs" / model / "cpu.yaml").read_text())["handler"]
    assert desc["model"] == model and schema["additionalProperties"] is False
    if model == "sd15":
        assert schema["properties"]["steps"]["maximum"] == cfg["max_steps"]
        assert schema["properties"]["guidance_scale"]["maximum"] == cfg["max_guidance_scale"]
        assert schema["required"] == ["prompt"]
        assert desc["schedulers"] == ["pndm", "ddim", "euler", "dpm++"]
    elif model == "ddpm":
        assert schema["properties"]["num_images"]["maximum"] == cfg["max_num_images"]
        assert desc["schedulers"] == ["ddim", "ddpm", "dpm++", "unipc", "euler"]
    else:
        assert schema["properties"]["topk"]["maximum"] == len(desc["labels"]) == 10
        assert "gradcam" in desc["methods"] and "scorecam" in desc["methods"]
        assert schema["properties"]["method"]["x-splits-batch"] is True


def test_limits_come_from_the_archives_target(tmp_path):
    arm = yaml.safe_load((REPO / "model_configs" / "sd15" / "arm64.yaml").read_text())["handler"]
    handler, ctx = load_handler(Sd15Handler, "sd15", unpack(tmp_path, "sd15", demo_weights("sd15"), "arm64"), "arm64")
    props = handler.model.request.json_schema()["properties"]
    assert props["width"]["anyOf"][0]["maximum"] == arm["max_size"] == 768
    assert props["num_images"]["maximum"] == arm["max_num_images"]
    (out,) = run_batch(handler, ctx, [{"body": {"prompt": "x", "width": 1024, "height": 64, "steps": 1}}])
    assert ctx.status(0) == 400 and json.loads(out)["field"] == "width" and "768" in json.loads(out)["error"]


def test_a_limit_missing_from_the_yaml_fails_the_load(tmp_path):
    """No fallback in code shadows the yaml: a config without max_steps does not load."""
    model_dir = unpack(tmp_path, "ddpm", demo_weights("ddpm"))
    cfg = yaml.safe_load((model_dir / "cpu.yaml").read_text())
    del cfg["handler"]["max_steps"]
    (model_dir / "cpu.yaml").unlink()
    (model_dir / "cpu.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(KeyError, match="max_steps"):
        load_handler(DdpmHandler, "ddpm", model_dir)


def test_per_request_fields_stay_per_request_in_one_group(cam_handler, monkeypatch):
    """Two cam requests differing only in topk and target (per-request fields) share one forward
    pass and each get their own values."""
    handler, ctx = cam_handler
    groups = []
    run_group = handler.model.run_group
    monkeypatch.setattr(handler.model, "run_group", lambda g, progress: groups.append(g) or run_group(g, progress))
    images, _ = digits.load_arrays()
    import base64
    img = base64.b64encode(png_bytes(digits.to_pil(images[0], 64))).decode()
    outs = run_batch(handler, ctx, [{"body": {"image": img, "topk": 2, "target": 3}},
                                    {"body": {"image": img, "topk": 4, "target": 7}}])
    a, b = (json.loads(o) for o in outs)
    assert len(groups) == 1 and len(groups[0].requests) == 2
    assert set(groups[0].shared) == {"method"}
    assert (len(a["predictions"]), a["cam"]["target"]) == (2, 3)
    assert (len(b["predictions"]), b["cam"]["target"]) == (4, 7)


def test_per_request_trajectory_in_one_ddpm_group(ddpm_handler, monkeypatch):
    handler, ctx = ddpm_handler
    groups = []
    run_group = handler.model.run_group
    monkeypatch.setattr(handler.model, "run_group", lambda g, progress: groups.append(g) or run_group(g, progress))
    outs = run_batch(handler, ctx, [{"body": {"steps": 3, "seed": 1, "num_images": 2}},
                                    {"body": {"steps": 3, "seed": 2, "trajectory": True}}])
    a, b = (json.loads(o) for o in outs)
    assert len(groups) == 1 and set(groups[0].shared) == {"steps", "scheduler", "eta"}
    assert len(a["images"]) == 2 and "trajectory" not in a and (a["seed"], b["seed"]) == (1, 2)
    assert len(b["images"]) == 1 and b["trajectory"]


def test_a_batched_field_splits_the_group(ddpm_handler, monkeypatch):
    handler, ctx = ddpm_handler
    groups = []
    run_group = handler.model.run_group
    monkeypatch.setattr(handler.model, "run_group", lambda g, progress: groups.append(g) or run_group(g, progress))
    outs = run_batch(handler, ctx, [{"body": {"steps": 3, "seed": 1}}, {"body": {"steps": 4, "seed": 1}},
                                    {"body": {"steps": 3, "seed": 5}}])
    assert [len(g.requests) for g in groups] == [2, 1]
    assert [json.loads(o)["steps"] for o in outs] == [3, 4, 3]


@pytest.mark.parametrize("model", sorted(HANDLERS))
def test_handler_module_has_the_one_class_torchserve_loads(model):
    """TorchServe's model loader refuses a handler module that defines more than one class, so
    the model, its request and the adapter live in modules of their own (handlers/<model>/)."""
    import importlib

    from ts.utils.util import list_classes_from_module

    assert list_classes_from_module(importlib.import_module(f"handlers.{model}.handler")) == [HANDLERS[model]]
