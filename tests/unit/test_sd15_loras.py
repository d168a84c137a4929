"""LoRAs per request, in-process on the sd15 smoke pipeline: the folder and what describe lists,
validation (400 naming `loras`, the rest of the batch unharmed), scale 0 = the base model,
grouping by LoRA set, the same image alone or batched, the memory-budgeted cache, files changed
on disk, a LoRA that does not fit the model, and the PNG's A1111 parameters."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from handlers.core.precision import unet_dtype
from harness import REPO
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, pixels, unpack
from harness.loras import random_lora

BASE = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 3}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Two LoRAs in each format (one with a text encoder part) and one for a wider UNet."""
    src = tmp_path_factory.mktemp("lora-src")
    weights = demo_weights("sd15-smoke")
    return {
        "alpha": random_lora(weights, src / "alpha.safetensors", seed=1, text_encoder=True),
        "beta": random_lora(weights, src / "beta.safetensors", seed=2, fmt="kohya"),
        "gamma": random_lora(weights, src / "gamma.safetensors", seed=3, fmt="kohya", text_encoder=True),
        "wide": random_lora(weights, src / "wide.safetensors", seed=4, cross_attention_dim=1024),
    }


def handler_with(tmp_path, files: dict, **overrides):
    """The smoke pipeline's handler with a LoRA folder holding `files` (name -> source path)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    for name, path in files.items():
        shutil.copy(path, folder / f"{name}.safetensors")
    from handlers.sd15.handler import Sd15Handler

    model_dir = unpack(tmp_path / "model", "sd15", demo_weights("sd15-smoke"),
                       handler_overrides={"lora_dir": str(folder), **overrides})
    handler, ctx = load_handler(Sd15Handler, "sd15", model_dir)
    return handler, ctx, folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, lora_files):
    tmp = tmp_path_factory.mktemp("lora-handler")
    return handler_with(tmp, {n: lora_files[n] for n in ("alpha", "beta", "gamma")})


def one(handler, ctx, body: dict) -> dict:
    (out,) = run_batch(handler, ctx, [{"body": body}])
    assert ctx.status(0) == 200, out
    return json.loads(out)


def image(answer: dict) -> np.ndarray:
    return pixels(answer["images"][0])


def describe(handler, ctx) -> dict:
    return handler.model.describe()


def test_describe_lists_the_folder_and_refuses_what_cannot_load(served, tmp_path):
    handler, ctx, folder = served
    listed = describe(handler, ctx)
    assert {(d["name"], d["format"]) for d in listed["loras"]} == {("alpha", "diffusers"), ("beta", "kohya"),
                                                                   ("gamma", "kohya")}
    assert all(d["size_mb"] > 0 for d in listed["loras"])
    (folder / "pickled.ckpt").write_bytes(b"\x80\x04not really")
    (folder / "checkpoint.safetensors").write_bytes((folder / "alpha.safetensors").read_bytes()[:100])  # truncated
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(folder / "whole.safetensors"))
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)},
              str(folder / "xl.safetensors"))
    try:
        refused = {d["name"]: d["error"] for d in describe(handler, ctx)["refused_loras"]}
        assert "runs code" in refused["pickled"]
        assert "not a readable safetensors file" in refused["checkpoint"]
        assert "whole checkpoint" in refused["whole"]
        assert "SDXL" in refused["xl"]
        (out,) = run_batch(handler, ctx, [{"body": {**BASE, "loras": [{"name": "xl"}]}}])
        assert ctx.status(0) == 400 and json.loads(out)["field"] == "loras"
    finally:
        for name in ("pickled.ckpt", "checkpoint.safetensors", "whole.safetensors", "xl.safetensors"):
            (folder / name).unlink()


@pytest.mark.parametrize("loras, message", [
    ([{"name": "nope"}], "unknown LoRA 'nope'"),
    ([{"name": "alpha", "scale": 2.5}], "must be in [-1.0, 2.0]"),
    ([{"name": "alpha"}, {"name": "alpha", "scale": 0.5}], "named twice"),
    ([{"name": "alpha"}, {"name": "beta"}, {"name": "gamma"}, {"name": "alpha"}, {"name": "beta"}], "at most 4"),
    ("alpha", "must be a list of objects with 'name', 'scale'"),
    ('[{"name": "nope"}]', "unknown LoRA 'nope'"),  # the list's JSON text (KServe v2 BYTES, forms) is read as the list
    ([{"name": "alpha", "weight": 1}], "'loras'"),
    ([{"name": "alpha", "scale": "1"}], "'loras'"),
])
def test_bad_loras_get_400_and_the_batch_survives(served, loras, message):
    handler, ctx, _ = served
    outs = run_batch(handler, ctx, [{"body": {**BASE, "loras": loras}}, {"body": {**BASE, "loras": [{"name": "beta"}]}}])
    err = json.loads(outs[0])
    assert (ctx.status(0), err["field"]) == (400, "loras") and message in err["error"], err
    assert ctx.status(1) == 200 and json.loads(outs[1])["loras"] == [{"name": "beta", "scale": 1.0}]


def test_scale_zero_is_the_base_model_and_scale_one_is_not(served):
    handler, ctx, _ = served
    base = image(one(handler, ctx, BASE))
    for name in ("alpha", "beta", "gamma"):
        assert np.array_equal(image(one(handler, ctx, {**BASE, "loras": [{"name": name, "scale": 0.0}]})), base), name
        assert np.abs(image(one(handler, ctx, {**BASE, "loras": [{"name": name}]})) - base).max() > 20, name
    assert np.array_equal(image(one(handler, ctx, BASE)), base)  # after LoRAs ran: the base again, exactly


def test_kohya_and_diffusers_files_of_one_lora_give_one_image(tmp_path):
    weights = demo_weights("sd15-smoke")
    files = {"d": random_lora(weights, tmp_path / "d.safetensors", seed=7, text_encoder=True),
             "k": random_lora(weights, tmp_path / "k.safetensors", seed=7, fmt="kohya", text_encoder=True)}
    handler, ctx, _ = handler_with(tmp_path, files)
    d = image(one(handler, ctx, {**BASE, "loras": [{"name": "d", "scale": 0.7}]}))
    assert np.array_equal(image(one(handler, ctx, {**BASE, "loras": [{"name": "k", "scale": 0.7}]})), d)


def test_lora_sets_never_share_a_unet_call_and_batched_equals_alone(served, monkeypatch):
    handler, ctx, _ = served
    bodies = [{**BASE, "seed": 1}, {**BASE, "seed": 2, "loras": [{"name": "alpha"}]},
              {**BASE, "seed": 3, "loras": [{"name": "beta", "scale": 0.5}, {"name": "alpha"}]},
              {**BASE, "seed": 4, "loras": [{"name": "alpha"}, {"name": "beta", "scale": 0.5}]},  # same set, other order
              {**BASE, "seed": 5, "loras": [{"name": "alpha", "scale": 0.5}]}]
    groups = []
    run_group = handler.model.run_group
    monkeypatch.setattr(handler.model, "run_group",
                        lambda group, progress: groups.append(group.shared["lora_set"]) or run_group(group, progress))
    batched = run_batch(handler, ctx, [{"body": b} for b in bodies])
    assert [ctx.status(i) for i in range(len(bodies))] == [200] * len(bodies)
    assert sorted(groups) == sorted([(), (("alpha", 1.0),), (("alpha", 1.0), ("beta", 0.5)), (("alpha", 0.5),)])
    for body, out in zip(bodies, batched):
        alone = image(one(handler, ctx, body))
        assert np.abs(image(json.loads(out)) - alone).max() <= 1, body  # the project's batching rule


def test_cache_keeps_the_budget_least_recently_used_first(tmp_path, lora_files):
    from handlers.sd15.loras import MIB, LoraLibrary

    config = yaml.safe_load((REPO / "model_configs/sd15/cpu.yaml").read_text())["handler"]
    itemsize = unet_dtype(config, torch.device("cpu"), torch.float32).itemsize  # LoRAs load in the UNet's dtype
    sizes = LoraLibrary(str(lora_files["alpha"].parent), 1, itemsize).usable()
    room = (sizes["alpha"] + sizes["beta"] + sizes["gamma"] / 2) / MIB  # any two of the three, never all
    handler, ctx, _ = handler_with(tmp_path, {n: lora_files[n] for n in ("alpha", "beta", "gamma")},
                                   lora_cache_mb=room)
    library = handler.model.loras
    first = image(one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]}))
    one(handler, ctx, {**BASE, "loras": [{"name": "beta"}]})
    one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]})  # alpha is now the most recent
    assert list(library.loaded) == ["beta", "alpha"]
    one(handler, ctx, {**BASE, "loras": [{"name": "gamma"}]})
    assert list(library.loaded) == ["alpha", "gamma"] and library.used() <= room * MIB
    adapters = handler.model.pipes["txt2img"].get_list_adapters()
    assert "beta" not in adapters.get("unet", []) and "beta" not in adapters.get("text_encoder", [])
    one(handler, ctx, {**BASE, "loras": [{"name": "beta"}]})
    assert list(library.loaded) == ["gamma", "beta"]
    assert np.array_equal(image(one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]})), first)  # reloaded, same
    (out,) = run_batch(handler, ctx, [{"body": {**BASE, "loras": [{"name": "alpha"}, {"name": "beta"}, {"name": "gamma"}]}}])
    assert ctx.status(0) == 400 and "lora_cache_mb" in json.loads(out)["error"]


def test_a_file_changed_on_disk_is_reloaded_and_a_new_file_is_usable(tmp_path, lora_files):
    handler, ctx, folder = handler_with(tmp_path, {"alpha": lora_files["alpha"]})
    before = image(one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]}))
    shutil.copy(lora_files["beta"], folder / "alpha.safetensors")
    stat = os.stat(folder / "alpha.safetensors")
    os.utime(folder / "alpha.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = image(one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]}))
    beta = image(one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]}))
    assert not np.array_equal(before, after) and np.array_equal(after, beta)
    shutil.copy(lora_files["gamma"], folder / "late.safetensors")
    assert "late" in {d["name"] for d in describe(handler, ctx)["loras"]}
    one(handler, ctx, {**BASE, "loras": [{"name": "late"}]})


def test_a_lora_that_does_not_fit_is_a_400_and_the_worker_goes_on(tmp_path, lora_files):
    handler, ctx, _ = handler_with(tmp_path, {"wide": lora_files["wide"], "alpha": lora_files["alpha"]})
    base = image(one(handler, ctx, BASE))
    outs = run_batch(handler, ctx, [{"body": {**BASE, "loras": [{"name": "wide"}]}}, {"body": BASE}])
    err = json.loads(outs[0])
    assert (ctx.status(0), err["field"]) == (400, "loras") and "does not fit this model" in err["error"], err
    assert ctx.status(1) == 200 and np.array_equal(image(json.loads(outs[1])), base)
    assert "wide" in {d["name"] for d in describe(handler, ctx)["refused_loras"]}
    assert handler.model.pipes["txt2img"].get_list_adapters().get("unet", []) == []
    one(handler, ctx, {**BASE, "loras": [{"name": "alpha"}]})


def test_png_parameters_name_the_loras_as_a1111_does(served):
    handler, ctx, _ = served
    answer = one(handler, ctx, {**BASE, "loras": [{"name": "beta", "scale": 0.5}, {"name": "alpha"}]})
    text = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).text["parameters"]
    library = handler.model.loras
    assert text.startswith(f"{BASE['prompt']} <lora:beta:0.5> <lora:alpha:1>\n")
    assert f'Lora hashes: "beta: {library.hash_of("beta")}, alpha: {library.hash_of("alpha")}"' in text
    assert len(library.hash_of("alpha")) == 12 and library.hash_of("alpha") != library.hash_of("beta")
