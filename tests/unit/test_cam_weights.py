"""Tests for the `cam` weights builders (weights/build_cam_demo.py, weights/prepare_cam_pretrained.py).

They check the directory contract the `cam` handler reads: model.safetensors loads strictly into
torchvision.models.get_model(arch, num_classes) and cam_config.json has every key. Fast: the demo
build runs one epoch on a few digits at a small size; the pretrained one uses a random ResNet-50.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file

from handlers.cam import classifier as cam_model
from weights import build_cam_demo, digits, prepare_cam_pretrained

REPO = Path(__file__).resolve().parents[2]
CONFIG_KEYS = {"arch", "num_classes", "labels", "resize", "input_size", "mean", "std", "grayscale",
               "target_layer", "profile", "source", "metrics"}


def load_cam_dir(path: Path) -> tuple[dict, torch.nn.Module]:
    config = json.loads((path / "cam_config.json").read_text())
    assert CONFIG_KEYS <= set(config), CONFIG_KEYS - set(config)
    assert len(config["labels"]) == config["num_classes"]
    assert len(config["mean"]) == 3 and len(config["std"]) == 3
    assert config["target_layer"] == "layer4"
    model = torchvision.models.get_model(config["arch"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    assert hasattr(model, config["target_layer"])
    return config, model.eval()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_demo_build_produces_loadable_dir(tmp_path):
    out = tmp_path / "demo" / "cam"
    # One thread: on a busy CI machine two OpenMP threads on two contended cores are ~7x slower.
    args = ["--out", str(out), "--epochs", "1", "--input-size", "32", "--train-limit", "96", "--threads", "1"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert build_cam_demo.main(args) == 0
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    config, model = load_cam_dir(out)
    assert config["arch"] == "resnet18" and config["profile"] == "demo"
    assert config["labels"] == [str(d) for d in range(10)]
    assert config["grayscale"] is True and config["resize"] == config["input_size"] == 32
    m = config["metrics"]
    for key in ("heldout_accuracy", "train_seconds", "epochs", "seed"):
        assert key in m
    assert m["epochs"] == 1 and m["seed"] == 0 and 0.0 <= m["heldout_accuracy"] <= 1.0

    # The handler's PIL preprocessing on a digit gives the tensor the model was trained on.
    images, _ = digits.load_arrays()
    pre = cam_model.preprocess(config)
    x_pil = torch.stack([pre(digits.to_pil(im, 32)) for im in images[:8]])
    x_train = build_cam_demo.to_model_input(digits.upscale(images[:8], 32), config)
    torch.testing.assert_close(x_pil, x_train, atol=1e-5, rtol=0)
    with torch.inference_mode():
        assert model(x_pil).shape == (8, 10)

    # Rebuilding replaces the directory atomically, deterministically, without leftovers.
    first = load_file(str(out / "model.safetensors"))
    assert build_cam_demo.main(args) == 0
    second = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert leftovers(out.parent) == []


def test_pretrained_from_weights_file(tmp_path, fake_resnet50_file, capsys):
    out = tmp_path / "pretrained" / "cam"
    assert prepare_cam_pretrained.main(["--out", str(out), "--weights-file", str(fake_resnet50_file)]) == 0
    config, model = load_cam_dir(out)
    assert config["arch"] == "resnet50" and config["profile"] == "pretrained"
    assert config["num_classes"] == 1000 and len(config["labels"]) == 1000
    assert config["labels"][0] == "tench" and config["labels"][999] == "toilet tissue"
    assert (config["resize"], config["input_size"]) == (232, 224)
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    assert config["grayscale"] is False and config["metrics"] == {}
    expected = torch.load(fake_resnet50_file, weights_only=True)
    assert torch.equal(model.state_dict()["fc.weight"], expected["fc.weight"])
    assert "not the published" in capsys.readouterr().err  # random weights: the hash warning fires
    assert leftovers(out.parent) == []


def test_pretrained_from_torch_hub_cache(tmp_path, fake_resnet50_file, monkeypatch):
    monkeypatch.delenv(prepare_cam_pretrained.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(fake_resnet50_file.parent.parent))
    out = tmp_path / "cam"
    assert prepare_cam_pretrained.main(["--out", str(out)]) == 0
    assert len(load_cam_dir(out)[0]["labels"]) == 1000


def test_pretrained_missing_file_fails_clearly(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    env.pop(prepare_cam_pretrained.ENV_VAR, None)
    out = tmp_path / "cam"
    proc = subprocess.run([sys.executable, "-m", "weights.prepare_cam_pretrained", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    msg = lines[0]
    expected_path = tmp_path / "torch_home" / "hub" / "checkpoints" / prepare_cam_pretrained.FILENAME
    assert str(expected_path) in msg and "resnet50(weights='IMAGENET1K_V2')" in msg
    assert not out.exists()


def test_pretrained_rejects_wrong_file(tmp_path, capsys):
    bad = tmp_path / prepare_cam_pretrained.FILENAME
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    assert prepare_cam_pretrained.main(["--out", str(tmp_path / "cam"), "--weights-file", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not match" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cam").exists()
