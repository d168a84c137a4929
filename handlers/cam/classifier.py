"""The `cam` weights directory, read one way by the handler, the weights builders and the evaluation:
cam_config.json (read and checked), the torchvision classifier it names with model.safetensors
loaded, and the eval preprocessing it describes (PIL image -> normalised model input)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torchvision.transforms import v2

CONFIG_NAME = "cam_config.json"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_KEYS = ("arch", "num_classes", "labels", "resize", "input_size", "mean", "std", "background")
DEFAULTS = {"grayscale": False, "target_layer": "layer4", "classifier_layer": "fc"}


def parse_config(text: str | bytes, source: str | os.PathLike) -> dict:
    """A cam_config.json's text -> its dict with DEFAULTS filled in; ValueError naming `source`
    when it is not JSON or lacks a key or is inconsistent."""
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"cam: {source} is not valid JSON: {exc}") from None
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"cam: {source} lacks {', '.join(missing)}")
    if len(cfg["labels"]) != cfg["num_classes"]:
        raise ValueError(f"cam: {source} has {len(cfg['labels'])} labels for num_classes {cfg['num_classes']}")
    if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3:
        raise ValueError(f"cam: {source} needs 3 values (RGB) in mean and std")
    bg = cfg["background"]
    if not (isinstance(bg, list) and len(bg) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in bg)):
        raise ValueError(f"cam: {source}: background (what transparent pixels become) must be [r, g, b] in 0..255")
    return {**DEFAULTS, **cfg}


def read_config(wdir: str | os.PathLike) -> dict:
    """The checked cam_config.json of a cam weights directory."""
    path = Path(wdir, CONFIG_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"cam: missing weights file {path}")
    return parse_config(path.read_bytes(), path)


def build_model(cfg: dict) -> torch.nn.Module:
    """The config's torchvision classifier, randomly initialised."""
    return torchvision.models.get_model(cfg["arch"], num_classes=int(cfg["num_classes"]))


def load_model(wdir: str | os.PathLike, cfg: dict) -> torch.nn.Module:
    """The config's classifier with the directory's model.safetensors loaded (strictly), in eval mode."""
    path = Path(wdir, WEIGHTS_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"cam: missing weights file {path}")
    model = build_model(cfg)
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - corrupt file, wrong arch, wrong shapes: one message
        raise RuntimeError(f"cam: cannot load weights file {path}: {exc}") from exc
    return model.eval()


def crop_transform(cfg: dict) -> v2.Compose:
    """Resize + centre crop of an RGB PIL image: the picture the model (and the CAM) sees."""
    return v2.Compose([v2.Resize(int(cfg["resize"])), v2.CenterCrop(int(cfg["input_size"]))])


def tensor_transform(cfg: dict) -> v2.Compose:
    """Cropped PIL image -> float tensor scaled to [0, 1] and normalised with the config's mean/std."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])])


def _rgb(image):
    return image.convert("RGB")


def _grey_rgb(image):
    return image.convert("L").convert("RGB")


def preprocess(cfg: dict) -> v2.Compose:
    """The whole eval preprocessing of any PIL image: grey (as three equal channels) when the
    config says grayscale, else RGB; then crop_transform and tensor_transform."""
    return v2.Compose([v2.Lambda(_grey_rgb if cfg["grayscale"] else _rgb), crop_transform(cfg), tensor_transform(cfg)])
