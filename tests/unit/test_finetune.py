"""The fine-tuning lab's pieces in-process: the shifted dataset, fine-tuning, bad folders."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from handlers.cam import CamHandler
from tests.conftest import demo_weights, load_handler, png_bytes, unpack
from tests.support.context import run_batch
from tests.support.shifted import tiny_folder
from weights import digits, finetune_cam, make_shifted_digits


def test_few_steps_change_the_weights_and_stay_servable(tmp_path):
    out = tmp_path / "ft"
    metrics = finetune_cam.finetune(tiny_folder(tmp_path / "data"), demo_weights("cam"), out, epochs=1,
                                    max_steps=2, batch_size=8, threads=1)
    assert metrics["head_replaced"] is False and metrics["train_count"] > 0
    before = load_file(str(demo_weights("cam") / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", out))
    (resp,) = run_batch(handler, ctx, [{"body": png_bytes(Image.open(next((tmp_path / "data" / "3").iterdir())))}])
    body = json.loads(resp)
    assert ctx.status(0) == 200 and len(body["cam"]["map"]) == 4


def test_new_classes_replace_the_head(tmp_path):
    data = tiny_folder(tmp_path / "data", classes=(3, 7))
    out = tmp_path / "ft"
    metrics = finetune_cam.finetune(data, demo_weights("cam"), out, epochs=1, max_steps=1, threads=1)
    cfg = json.loads((out / "cam_config.json").read_text())
    assert metrics["head_replaced"] and cfg["labels"] == ["3", "7"] and cfg["num_classes"] == 2
    assert load_file(str(out / "model.safetensors"))["fc.weight"].shape[0] == 2


@pytest.mark.parametrize("problem", ["empty", "one-class", "not-an-image"])
def test_bad_folders_fail_clearly(tmp_path, problem, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if problem == "one-class":
        tiny_folder(data, classes=(5,))
    if problem == "not-an-image":
        tiny_folder(data, classes=(1, 2))
        (data / "2" / "notes.png").write_text("not an image")
    code = finetune_cam.main([str(data), "--out", str(tmp_path / "ft"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    expected = {"empty": "Couldn't find any class folder", "one-class": "1 class folder",
                "not-an-image": "notes.png is not a readable image"}[problem]
    assert expected in err
    assert not (tmp_path / "ft").exists()


def test_shifted_digits_fool_the_original_model(tmp_path):
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", demo_weights("cam")))
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    pick = test[:40]
    rows = [{"body": png_bytes(Image.fromarray(a))} for a in make_shifted_digits.shift(images[pick], 64, seed=1)]
    preds = [json.loads(o)["predictions"][0]["index"] for o in run_batch(handler, ctx, rows)]
    assert sum(int(p) == int(y) for p, y in zip(preds, labels[pick])) / len(pick) < 0.5
