"""cam benchmark: CAM cost over classification alone, served vs. in-process throughput, latency.

- cam_cost_ratio: time of (classification + fast CAM) / time of classification alone, same batch
  of preprocessed tensors, in-process. gradcam_library_cost_ratio: the same for
  pytorch-grad-cam's GradCAM (backward pass), for comparison.
- served_over_raw: throughput of a real TorchServe at concurrency 16 (archive's batch size) /
  throughput of the handler's own handle() in-process on batches of that size.
- latency at concurrency 1 through the server.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from benchmarks.measure import interleaved, latency_ms, load
from handlers.cam import CamHandler
from tests.conftest import load_handler, png_bytes, unpack
from tests.support.context import run_batch
from tests.support.torchserve import REPO, TorchServeInstance
from weights import digits

CONCURRENCY = 16


def run() -> dict:
    torch.set_num_threads(2)
    batch_size = yaml.safe_load((REPO / "model_configs/cam/cpu.yaml").read_text())["batchSize"]
    handler, ctx = load_handler(CamHandler, "cam", unpack(Path(tempfile.mkdtemp()) / "cam", "cam",
                                                          REPO / "weights/demo/cam"))
    images, _ = digits.load_arrays()
    pngs = [png_bytes(digits.to_pil(im, 64)) for im in images[:batch_size]]
    batch = torch.stack([handler.to_tensor(handler.crop(digits.to_pil(im, 64).convert("RGB")))
                         for im in images[:batch_size]])
    targets = [None] * batch_size
    gradcam = GradCAM(model=handler.model, target_layers=[handler.model.layer4])
    gc_targets = [ClassifierOutputTarget(0)] * batch_size
    t = interleaved({
        "classify": lambda: handler.classify(batch),
        "fast_cam": lambda: handler.fast_cam(batch, targets),
        "gradcam_library": lambda: gradcam(input_tensor=batch, targets=gc_targets),
    }, repeats=15)
    rows = [{"body": p} for p in pngs]
    handle_s = interleaved({"handle": lambda: run_batch(handler, ctx, rows)}, repeats=8)["handle"]
    raw_ips = batch_size / handle_s

    with TorchServeInstance(archives=["cam.mar"]) as ts:
        client = ts.client

        def call(i: int):
            resp = client.predict_raw("cam", pngs[i % len(pngs)])
            assert resp.status_code == 200, resp.text
        load(call, 2 * CONCURRENCY, CONCURRENCY)  # warm-up
        served_ips = load(call, 12 * CONCURRENCY, CONCURRENCY)
        lat = latency_ms(lambda: call(0), 40)

    return {
        "batch_size": batch_size,
        "cam_cost_ratio": round(t["fast_cam"] / t["classify"], 3),
        "gradcam_library_cost_ratio": round(t["gradcam_library"] / t["classify"], 3),
        "classify_batch_ms": round(t["classify"] * 1000, 1),
        "in_process_images_per_s": round(raw_ips, 1),
        "served_images_per_s_c16": round(served_ips, 1),
        "served_over_raw": round(served_ips / raw_ips, 3),
        "latency_c1": lat,
        "goals": {"cam_cost_ratio": "<= 1.15", "served_over_raw": ">= 0.8"},
        "notes": ["in-process throughput = handler.handle() on a batch of PNG requests "
                  "(decode, preprocess, forward+CAM, overlay PNG, JSON), same batch size as served"],
    }
