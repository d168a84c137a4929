"""The fine-tuning lab's pieces in-process: shifted dataset, fine-tuning, bad folders, compare
client's folder checks and report."""
from __future__ import annotations

import base64
import json
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

from handlers.cam import classifier as cam_model
from handlers.cam.handler import CamHandler
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, png_bytes, unpack
from lab import compare, finetune_cam, make_shifted_digits
from tests.support.shifted import tiny_folder
from weights import digits
from weights.image_folder import ImageFolderError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_few_steps_change_the_weights_and_stay_servable(tmp_path, capsys):
    out = tmp_path / "ft"
    deterministic = torch.are_deterministic_algorithms_enabled()
    metrics = finetune_cam.finetune(tiny_folder(tmp_path / "data"), demo_weights("cam"), out, epochs=1,
                                    max_steps=2, batch_size=8, threads=1)
    assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled() == deterministic
    assert metrics["steps"] == 2 and metrics["head"] == "kept"
    assert (metrics["train_count"], metrics["heldout_count"]) == (20, 10)  # 1 of 3 per class held out
    printed = capsys.readouterr().out
    assert "epoch 0 (base): held-out loss" in printed and "epoch 1/1: train loss" in printed
    before = load_file(str(demo_weights("cam") / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    base_cfg = json.loads((demo_weights("cam") / "cam_config.json").read_text())
    cfg = json.loads((out / "cam_config.json").read_text())
    for key in ("arch", "labels", "resize", "input_size", "mean", "std", "grayscale", "target_layer"):
        assert cfg[key] == base_cfg[key], key
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", out))
    image = Image.open(next((tmp_path / "data" / "3").iterdir()))
    (resp,) = run_batch(handler, ctx, [{"body": png_bytes(image)}])
    body = json.loads(resp)
    assert ctx.status(0) == 200 and len(body["cam"]["map"]) == 4 and body["cam"]["overlay"]


def test_base_can_be_an_archive(tmp_path):
    mar = tmp_path / "cam.mar"
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_STORED) as z:
        for name in ("cam_config.json", "model.safetensors"):
            z.write(demo_weights("cam") / name, f"weights/{name}")
    cfg, state = finetune_cam.read_base(mar)
    assert cfg == cam_model.read_config(demo_weights("cam"))
    assert torch.equal(state["fc.weight"], load_file(str(demo_weights("cam") / "model.safetensors"))["fc.weight"])
    with pytest.raises(finetune_cam.FinetuneError, match="no cam weights"):
        finetune_cam.read_base(tmp_path)


def test_new_classes_replace_the_head(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    old = model.fc.weight.detach().clone()
    assert finetune_cam.adapt_head(model, "fc", digits.LABELS, digits.LABELS) is None
    assert finetune_cam.adapt_head(model, "fc", digits.LABELS, ["3", "7", "cat"]) == 2
    assert model.fc.out_features == 3
    assert torch.equal(model.fc.weight[0], old[3]) and torch.equal(model.fc.weight[1], old[7])

    out = tmp_path / "ft"
    metrics = finetune_cam.finetune(tiny_folder(tmp_path / "data", classes=(3, 7)), demo_weights("cam"), out,
                                    epochs=1, max_steps=1, threads=1)
    cfg = json.loads((out / "cam_config.json").read_text())
    assert metrics["head"] == "replaced (2 rows kept)"
    assert cfg["labels"] == ["3", "7"] and cfg["num_classes"] == 2
    assert load_file(str(out / "model.safetensors"))["fc.weight"].shape[0] == 2


def test_held_out_split_is_stratified_and_seeded():
    targets = [0] * 10 + [1] * 5 + [2] * 1
    train, val = finetune_cam.stratified_split(targets, 0.2, seed=0)
    assert sorted(train + val) == list(range(16))
    assert [sum(targets[i] == c for i in val) for c in (0, 1, 2)] == [2, 1, 0]  # a lone image trains
    assert (train, val) == finetune_cam.stratified_split(targets, 0.2, seed=0)


@pytest.mark.parametrize("problem, message", [
    ("missing", "is not a directory"),
    ("empty", "Couldn't find any class folder"),
    ("one-class", "has 1 class folder (5)"),
    ("class-without-images", "Found no valid file for the classes 2"),
    ("not-an-image", "notes.png is not a readable image"),
])
def test_bad_folders_fail_clearly(tmp_path, capsys, problem, message):
    data = tmp_path / "data"
    if problem != "missing":
        data.mkdir()
    if problem == "one-class":
        tiny_folder(data, classes=(5,))
    if problem == "class-without-images":
        tiny_folder(data, classes=(1,))
        (data / "2").mkdir()
    if problem == "not-an-image":
        tiny_folder(data, classes=(1, 2))
        (data / "2" / "notes.png").write_text("not an image")
    code = finetune_cam.main([str(data), "--out", str(tmp_path / "ft"), "--epochs", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "ft").exists()


def test_shifted_dataset_layout(tmp_path):
    counts = make_shifted_digits.build(tmp_path / "shifted")
    train, test = digits.split_indices()
    assert counts == {"train": len(train), "test": len(test)}
    _, labels = digits.load_arrays()
    for split, idx in (("train", train), ("test", test)):
        files = sorted((tmp_path / "shifted" / split).glob("*/*.png"))
        assert sorted(int(f.stem) for f in files) == sorted(idx.tolist())
        assert all(int(f.parent.name) == labels[int(f.stem)] for f in files)
    images, _ = digits.load_arrays()
    assert np.array_equal(make_shifted_digits.shift(images[:4], 64, 1), make_shifted_digits.shift(images[:4], 64, 1))


def test_shifted_digits_fool_the_original_model(tmp_path):
    handler, ctx = load_handler(CamHandler, "cam", unpack(tmp_path / "model", "cam", demo_weights("cam")))
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    pick = test[:40]
    rows = [{"body": png_bytes(Image.fromarray(a))} for a in make_shifted_digits.shift(images[pick], 64, seed=1)]
    preds = [json.loads(o)["predictions"][0]["index"] for o in run_batch(handler, ctx, rows)]
    assert sum(int(p) == int(y) for p, y in zip(preds, labels[pick])) / len(pick) < 0.5


@pytest.mark.parametrize("problem, message", [
    ("empty", "Couldn't find any class folder"),
    ("no-images", "Found no valid file for the classes 3"),
    ("not-an-image", "bad.png is not a readable image"),
])
def test_compare_refuses_bad_folders_before_any_request(tmp_path, problem, message):
    data = tmp_path / "data"
    data.mkdir()
    if problem == "no-images":
        (data / "3").mkdir()
        (data / "3" / "readme.txt").write_text("no images here")
    if problem == "not-an-image":
        tiny_folder(data, per_class=1, classes=(1, 2))
        (data / "1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageFolderError, match=message):
        compare.labelled_images(data)
    code = compare.main([str(data), "--inference-url", "http://127.0.0.1:9", "--management-url", "http://127.0.0.1:9"])
    assert code == 1


def test_compare_report_files(tmp_path):
    data = tiny_folder(tmp_path / "data", per_class=1, classes=(1, 2))
    items = compare.labelled_images(data)
    overlay = base64.b64encode(png_bytes(Image.new("RGB", (8, 8)))).decode()
    result = {"model": "cam", "images": 2, "classes": {"1": 1, "2": 1},
              "versions": {v: {"accuracy": acc, "correct": int(acc * 2), "per_class": {"1": 1.0, "2": acc * 2 - 1}}
                           for v, acc in (("1.0", 0.5), ("2.0", 1.0))},
              "disagreements": [{"image": str(items[1][0]), "label": "2", "versions": {
                  "1.0": {"label": "7", "probability": 0.9}, "2.0": {"label": "2", "probability": 0.8}}}],
              "_overlays": [{"1.0": overlay, "2.0": overlay}]}
    written = json.loads(compare.write_json(result, tmp_path / "compare.json").read_text())
    assert "_overlays" not in written and written["versions"]["2.0"]["accuracy"] == 1.0
    page = compare.write_html(result, tmp_path / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and page.count("data:image/jpeg;base64,") == 2
    assert "1.0: 7 (0.90)" in page and "2.0: 2 (0.80)" in page
