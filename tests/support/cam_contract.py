"""What the cam contract promises between two answers for the same image, whether it was served
alone or in a batch, on x86 or on aarch64 (docs/targets.md): the same top-1 class and target,
probabilities and the coarse map within 1e-4, and an overlay within one colormap level.

Why one level: the overlay is `show_cam_on_image` of the upsampled map, which quantises the map
to 256 levels before the JET lookup. A map difference of ~1e-6 (another batch size picks another
kernel, another CPU another instruction set) moves a pixel that sits on a level boundary to the
next level: one JET step (at most 5 grey levels) times the heatmap's weight 0.5, plus one for
the final truncation to uint8: 3 grey levels. Measured on aarch64: 2, batched vs single and
aarch64 vs x86.
"""
from __future__ import annotations

import base64
import io
import math
import platform

import cv2
import numpy as np
import yaml
from PIL import Image

from deploy.targets import config_path
from handlers.cam import contract
from handlers.cam.model import OVERLAY_IMAGE_WEIGHT

ATOL = contract.BATCH["float32"]
MAP_CORRELATION_MIN = contract.MAP_CORRELATION_MIN
MAP_MAX_ABS = contract.MAP_MAX_ABS


def native_engine() -> str:
    """The int8 engine of this machine's CPU target: cpu.yaml's on x86-64, arm64.yaml's on aarch64."""
    target = "arm64" if platform.machine() in ("aarch64", "arm64") else "cpu"
    return yaml.safe_load(config_path("cam", target).read_text())["handler"]["quantized_engine"]


# What a precision other than float32 promises against float32's answer for the same image, on
# every held-out digit (tests/unit/test_cam_precisions.py): handlers/cam/contract.py's bounds, and
# `config`: the handler settings that select it on this machine's CPU.
CONFIGS = {
    "int8": {"quantize": "int8", "quantized_engine": native_engine()},
    "bfloat16": {"dtype_cpu": "bfloat16", "quantize": None},
    "float16": {"dtype_cpu": "float16", "quantize": None},
}
PRECISIONS = {name: {"config": config, "probability": contract.PROBABILITY[name], "batch": contract.BATCH[name]}
              for name, config in CONFIGS.items()}


def overlay_levels() -> int:
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET).astype(int)
    # floor(x + d) - floor(x) <= floor(d) + 1 for the truncation to uint8
    return math.floor(np.abs(np.diff(jet, axis=0)).max() * (1 - OVERLAY_IMAGE_WEIGHT)) + 1


def overlay(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["cam"]["overlay"]))), dtype=int)


def compare(a: dict, b: dict) -> dict:
    """Asserts the promise for two full cam answers (JSON bodies); returns the measured gaps."""
    assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
    assert a["cam"]["target"] == b["cam"]["target"]
    pa = {p["index"]: p["probability"] for p in a["predictions"]}
    pb = {p["index"]: p["probability"] for p in b["predictions"]}
    gaps = {
        "probability": max(abs(pa[i] - pb[i]) for i in pa.keys() & pb.keys()),
        "map": float(np.abs(np.array(a["cam"]["map"]) - np.array(b["cam"]["map"])).max()),
        "overlay": int(np.abs(overlay(a) - overlay(b)).max()),
    }
    assert gaps["probability"] <= ATOL and gaps["map"] <= ATOL, gaps
    assert gaps["overlay"] <= overlay_levels(), gaps
    return gaps


def map_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps (..., h, w) -> (...)."""
    a = a.reshape(*a.shape[:-2], -1)
    b = b.reshape(*b.shape[:-2], -1)
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def compare_precision(answer: dict, float32: dict, precision: str) -> dict:
    """Asserts `precision`'s promise (PRECISIONS) for one image's full answer against float32's;
    returns the measured gaps."""
    assert answer["predictions"][0]["index"] == float32["predictions"][0]["index"]
    p = {q["index"]: q["probability"] for q in answer["predictions"]}
    p32 = {q["index"]: q["probability"] for q in float32["predictions"]}
    m, m32 = np.array(answer["cam"]["map"], dtype=float), np.array(float32["cam"]["map"], dtype=float)
    gaps = {"probability": max(abs(p[i] - p32[i]) for i in p.keys() & p32.keys()),
            "correlation": float(map_correlation(m, m32)),
            "map": float(np.abs(m - m32).max())}
    assert gaps["probability"] <= PRECISIONS[precision]["probability"], gaps
    assert gaps["correlation"] >= MAP_CORRELATION_MIN and gaps["map"] <= MAP_MAX_ABS, gaps
    return gaps
