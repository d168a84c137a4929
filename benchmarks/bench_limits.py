"""Limits benchmark: are the speeds the time budgets assume conservative on this machine?

Each handler runs in-process (handle() through the mock context, demo weights) with the cpu
config's `handler: threads`; warm-up once, then the median of a few timed batches:

- ddpm: image-steps/s of batch-1 DDIM-20 requests vs the speed the worker estimated for itself
  (its StepClock after the warm-up at load: `1 / clock.seconds_per_unit`).
- sd15: work units/s (the handler's own cost model, `parse(...).cost()`) of batch-1 256x256
  4-step requests vs the worker's own estimate, likewise.
- cam: a full batch of `batchSize` worst-case uploads (a seeded RGB noise PNG at exactly
  `max_image_pixels`, sent as raw bytes: decode + classify + CAM + response) -> images/s vs
  `max_size_images_per_second`, and the batch's time vs responseTimeout x timeout_margin.

rate_over_config / rate_over_estimate >= 1 means the figure is conservative here (the time budget
the handler derives from it cannot be overrun on this machine at this load).
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from deploy.targets import config_path
from handlers.cam.handler import CamHandler
from handlers.ddpm.handler import DdpmHandler
from handlers.sd15.handler import Sd15Handler
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, png_bytes, unpack

TARGET = "cpu"
DIFFUSION_REPEATS = 5
CAM_REPEATS = 2  # a 4000x4000 noise PNG takes ~1-2 s to decode: a full batch ~15-20 s
DIFFUSION = {
    "ddpm": (DdpmHandler, {"steps": 20, "seed": 0}),
    "sd15": (Sd15Handler, {"prompt": "x", "steps": 4, "width": 256, "height": 256, "seed": 0}),
}


def config(model: str) -> dict:
    return yaml.safe_load(config_path(model, TARGET).read_text())


def loaded(cls, model: str):
    """(handler, ctx) on the demo weights with the target config; torch threads as configured."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_limits_{model}_")) / model
    handler, ctx = load_handler(cls, model, unpack(tmp, model, demo_weights(model), TARGET), TARGET)
    torch.set_num_threads(int(config(model)["handler"]["threads"]))  # initialize() set it; made explicit
    return handler, ctx


def batch_seconds(handler, ctx, rows: list, repeats: int) -> list[float]:
    """Seconds of each of `repeats` handle() calls on `rows` (all must answer 200)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch(handler, ctx, rows)
        times.append(time.perf_counter() - start)
        bad = [ctx.status(i) for i in range(len(rows)) if ctx.status(i) != 200]
        if bad:
            raise RuntimeError(f"{type(handler).__name__}: statuses {bad} on the benchmark batch")
    return times


def diffusion_rate(model: str) -> dict:
    cls, body = DIFFUSION[model]
    handler, ctx = loaded(cls, model)
    estimate = 1 / handler.model.budget.clock.seconds_per_unit  # before any group updates it: the load-time figure
    units = handler.model.parse(body).cost()
    rows = [{"body": body}]
    batch_seconds(handler, ctx, rows, 1)  # warm-up
    seconds = statistics.median(batch_seconds(handler, ctx, rows, DIFFUSION_REPEATS))
    measured = units / seconds
    return {"units_per_request": round(units, 4), "measured": measured, "estimate": estimate,
            "ratio": measured / estimate}


def noise_png(pixels: int) -> tuple[bytes, int]:
    """A seeded RGB noise PNG of the largest square within `pixels` (incompressible: the worst
    decode per pixel); (its bytes, its side)."""
    side = math.isqrt(pixels)
    arr = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(arr, "RGB")), side


def cam_worst_case() -> dict:
    cfg = config("cam")
    handler, ctx = loaded(CamHandler, "cam")
    big, side = noise_png(int(cfg["handler"]["max_image_pixels"]))
    batch_seconds(handler, ctx, [{"body": big}], 1)  # warm-up (one image: the model, the decoder)
    rows = [{"body": big}] * cfg["batchSize"]
    seconds = statistics.median(batch_seconds(handler, ctx, rows, CAM_REPEATS))
    figure = float(cfg["handler"]["max_size_images_per_second"])
    allowed = cfg["responseTimeout"] * cfg["handler"]["timeout_margin"]
    return {"side": side, "png_mb": len(big) / 1e6, "batch": cfg["batchSize"], "seconds": seconds,
            "measured": cfg["batchSize"] / seconds, "config": figure, "allowed": allowed,
            "timeout": cfg["responseTimeout"], "margin": cfg["handler"]["timeout_margin"]}


def run() -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ddpm, sd15 = diffusion_rate("ddpm"), diffusion_rate("sd15")
    cam = cam_worst_case()
    threads = {m: config(m)["handler"]["threads"] for m in ("ddpm", "sd15", "cam")}
    return {
        "target": TARGET,
        "ddpm.image_steps_per_s": round(ddpm["measured"], 1),
        "ddpm.worker_estimate_image_steps_per_s": round(ddpm["estimate"], 1),
        "ddpm.rate_over_estimate": round(ddpm["ratio"], 2),
        "ddpm.conservative": ddpm["ratio"] >= 1,
        "sd15.units_per_s": round(sd15["measured"], 3),
        "sd15.worker_estimate_units_per_s": round(sd15["estimate"], 3),
        "sd15.rate_over_estimate": round(sd15["ratio"], 2),
        "sd15.conservative": sd15["ratio"] >= 1,
        "cam.max_size_images_per_s": round(cam["measured"], 3),
        "cam.config_max_size_images_per_second": cam["config"],
        "cam.rate_over_config": round(cam["measured"] / cam["config"], 2),
        "cam.conservative": cam["measured"] >= cam["config"],
        "cam.full_batch_s": round(cam["seconds"], 2),
        "cam.timeout_x_margin_s": round(cam["allowed"], 1),
        "cam.full_batch_over_timeout_x_margin": round(cam["seconds"] / cam["allowed"], 3),
        "threads": threads,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "bench_seconds": round(time.perf_counter() - start, 1),
        "goals": {"ddpm.rate_over_estimate": ">= 1", "sd15.rate_over_estimate": ">= 1",
                  "cam.rate_over_config": ">= 1", "cam.full_batch_over_timeout_x_margin": "<= 1"},
        "notes": [f"cpu configs, handlers in-process with the config's threads ("
                  f"{', '.join(f'{m} {n}' for m, n in threads.items())}), demo weights; "
                  f"warm-up once, median of {DIFFUSION_REPEATS} (ddpm, sd15) / {CAM_REPEATS} (cam) batches",
                  f"ddpm: batch-1 DDIM-{DIFFUSION['ddpm'][1]['steps']} requests, demo UNet (16x16, 1.1 M params), "
                  "vs the worker's own estimate from its warm-up (batch-1 UNet calls at load)",
                  f"sd15: batch-1 requests of 256x256 at 4 steps = {sd15['units_per_request']} units (handler cost "
                  "model: 512x512 guided steps + VAE decode) vs the worker's estimate from its warm-up (a 2-step "
                  "256x256 request: the slowest of a step, the decode and the whole per unit); the cost model's "
                  "size scaling is SD1.5's, the demo model's may differ",
                  f"cam: a full batch of {cam['batch']} raw-bytes uploads of a seeded {cam['side']}x{cam['side']} "
                  f"RGB noise PNG ({cam['png_mb']:.0f} MB, at max_image_pixels): decode + classify + CAM + "
                  f"response; its time vs responseTimeout {cam['timeout']} s x timeout_margin {cam['margin']}",
                  "load_average: the machine's 1-minute load before and after: how busy it was"],
    }
