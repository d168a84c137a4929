"""ddpm benchmark (DDIM-50, one image per request, concurrency 8):

- batching_speedup: served images/s with the archive's batchSize / the same with batchSize 1
  (the same archive registered twice through the management API).
- served_over_raw: served images/s with the archive's settings / the handler's own sampling loop
  in-process on batches of 8 requests, with the threads of all served workers together.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.measure import interleaved, load
from handlers.ddpm import DdpmHandler
from tests.conftest import load_handler, unpack
from tests.support.context import run_batch
from tests.support.torchserve import REPO, TorchServeInstance

CONCURRENCY = 8
STEPS = 50
REQUESTS = 48


def served_ips(ts: TorchServeInstance, batch_size: int, workers: int) -> float:
    client = ts.client
    client.register("ddpm.mar", batch_size=batch_size, max_batch_delay=50, initial_workers=workers)
    client.wait_ready(["ddpm"], timeout=180)

    def call(i: int):
        resp = client.predict_raw("ddpm", {"steps": STEPS, "seed": i})
        assert resp.status_code == 200, resp.text

    load(call, CONCURRENCY, CONCURRENCY)  # warm-up
    rounds = [load(call, REQUESTS, CONCURRENCY) for _ in range(2)]
    client.unregister("ddpm")
    return statistics.median(rounds)


def run() -> dict:
    config = yaml.safe_load((REPO / "model_configs/ddpm/cpu.yaml").read_text())
    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(Path(tempfile.mkdtemp()) / "ddpm", "ddpm",
                                                            REPO / "weights/demo/ddpm"))
    # In-process gets the CPU threads all served workers have together: same CPU budget.
    threads = config["maxWorkers"] * config["handler"]["threads"]
    torch.set_num_threads(threads)
    rows = [{"body": {"steps": STEPS, "seed": i}} for i in range(CONCURRENCY)]
    raw = CONCURRENCY / interleaved({"batch": lambda: run_batch(handler, ctx, rows)}, repeats=4, warmup=1)["batch"]
    with TorchServeInstance(archives=["ddpm.mar"], load_at_start=False) as ts:
        batched = served_ips(ts, config["batchSize"], config["maxWorkers"])
        single = served_ips(ts, 1, config["maxWorkers"])
    return {
        "batch_size": config["batchSize"],
        "served_workers": config["maxWorkers"],
        "in_process_threads": threads,
        "in_process_images_per_s_b8": round(raw, 1),
        "served_images_per_s_c8": round(batched, 1),
        "served_images_per_s_c8_batch1": round(single, 1),
        "batching_speedup": round(batched / single, 2),
        "served_over_raw": round(batched / raw, 3),
        "goals": {"batching_speedup": ">= 1.8", "served_over_raw": ">= 0.9"},
        "notes": [f"DDIM-{STEPS}, 1 image per request, demo UNet (16x16, 1.1 M params)"],
    }
