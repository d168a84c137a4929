"""cam benchmark: CAM cost over classification alone, served vs. in-process throughput, latency.

- cam_cost_ratio: time of (classification + fast CAM) / time of classification alone, same batch
  of preprocessed tensors, in-process. gradcam_library_cost_ratio: the same for
  pytorch-grad-cam's GradCAM (backward pass), for comparison.
- served_over_raw: throughput of a real TorchServe at concurrency 16 (archive's batch size) /
  throughput of the handler's own handle() in-process on batches of that size, given the CPU
  threads of all served workers together (the same CPU budget).
- latency at concurrency 1 through the server.
"""
from __future__ import annotations

import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
import yaml
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from benchmarks.measure import interleaved, latency_ms, load
from handlers.cam.handler import CamHandler
from harness import REPO
from harness.context import run_batch
from harness.inprocess import load_handler, png_bytes, unpack
from harness.torchserve import TorchServeInstance
from weights import digits

CONCURRENCY = 16
ROUNDS = 3


def run() -> dict:
    config = yaml.safe_load((REPO / "model_configs/cam/cpu.yaml").read_text())
    batch_size = config["batchSize"]
    handler, ctx = load_handler(CamHandler, "cam", unpack(Path(tempfile.mkdtemp()) / "cam", "cam",
                                                          REPO / "weights/demo/cam"))
    # In-process gets the CPU threads all served workers have together: same CPU budget.
    cpu_threads = config["maxWorkers"] * config["handler"]["threads"]
    torch.set_num_threads(cpu_threads)
    images, _ = digits.load_arrays()
    pngs = [png_bytes(digits.to_pil(im, 64)) for im in images[:batch_size]]
    batch = torch.stack([handler.model.to_tensor(handler.model.crop(digits.to_pil(im, 64).convert("RGB")))
                         for im in images[:batch_size]])
    targets = [None] * batch_size
    gradcam = GradCAM(model=handler.model.net, target_layers=[handler.model.net.layer4])
    gc_targets = [ClassifierOutputTarget(0)] * batch_size
    t = interleaved({
        "classify": lambda: handler.model.classify(batch),
        "fast_cam": lambda: handler.model.fast_cam(batch, targets),
        "gradcam_library": lambda: gradcam(input_tensor=batch, targets=gc_targets),
    }, repeats=15)
    rows = [{"body": p} for p in pngs]

    with TorchServeInstance(archives=["cam.mar"]) as ts:
        client = ts.client
        batch_sizes: Counter = Counter()

        def call(i: int):
            resp = client.predict_raw("cam", pngs[i % len(pngs)])
            assert resp.status_code == 200, resp.text
            batch_sizes[int(resp.headers["X-Batch-Size"])] += 1

        load(call, 2 * CONCURRENCY, CONCURRENCY)  # warm-up
        batch_sizes.clear()
        # Alternate in-process and served rounds so both see the same machine load.
        raw, served = [], []
        for _ in range(ROUNDS):
            raw.append(batch_size / interleaved({"handle": lambda: run_batch(handler, ctx, rows)},
                                                repeats=6, warmup=1)["handle"])
            served.append(load(call, 6 * CONCURRENCY, CONCURRENCY))
        raw_ips, served_ips = statistics.median(raw), statistics.median(served)
        served_batches = dict(sorted(batch_sizes.items()))
        lat = latency_ms(lambda: call(0), 40)

    return {
        "batch_size": batch_size,
        "served_workers": config["maxWorkers"],
        "in_process_threads": cpu_threads,
        "cam_cost_ratio": round(t["fast_cam"] / t["classify"], 3),
        "gradcam_library_cost_ratio": round(t["gradcam_library"] / t["classify"], 3),
        "classify_batch_ms": round(t["classify"] * 1000, 1),
        "in_process_images_per_s": round(raw_ips, 1),
        "served_images_per_s_c16": round(served_ips, 1),
        "served_over_raw": round(served_ips / raw_ips, 3),
        "served_requests_by_batch_size": served_batches,
        "latency_c1": lat,
        "goals": {"cam_cost_ratio": "<= 1.15", "served_over_raw": ">= 0.8"},
        "notes": ["in-process throughput = handler.handle() on a batch of PNG requests "
                  "(decode, preprocess, forward+CAM, overlay PNG, JSON), same batch size as served, "
                  "with as many torch threads as the served workers have together",
                  "in-process and served rounds alternate (median of 3 each) so both see the same load"],
    }
