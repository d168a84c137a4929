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

import cv2
import numpy as np
from PIL import Image

from handlers.cam.model import OVERLAY_IMAGE_WEIGHT

ATOL = 1e-4

# What a precision other than float32 promises against float32's answer for the same image, on
# every held-out digit (tests/unit/test_cam_precisions.py; docs/targets.md, "cam precisions"): the
# same top-1, probabilities within `probability`, every coarse map correlated >= 0.98 with float32's
# and within 0.05 (maps are normalised to [0, 1]); and a batch within `batch` of each image alone.
# `config`: the handler settings that select it (on this x86 CPU).
MAP_CORRELATION_MIN = 0.98
MAP_MAX_ABS = 0.05
PRECISIONS = {
    "int8": {"config": {"quantize": "int8", "quantized_engine": "x86"}, "probability": 0.05, "batch": 0.0},
    "bfloat16": {"config": {"dtype_cpu": "bfloat16", "quantize": None}, "probability": 0.02, "batch": ATOL},
    "float16": {"config": {"dtype_cpu": "float16", "quantize": None}, "probability": 0.005, "batch": ATOL},
}


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
