"""ddpm benchmark (DDIM-50, one image per request, concurrency 8):

- batching_speedup: served images/s with the archive's batchSize / the same with batchSize 1
  (the same archive registered twice through the management API, under two names).
- served_over_raw: served images/s with the archive's settings / the handler's own sampling loop
  in-process on the same 8 requests at a time, split over as many processes (with the same
  threads) as the served workers, in one session of their own like TorchServe's workers. Linux
  gives every session an equal CPU share when the machine is busy, so both sides get the same
  CPU budget whatever else runs (one process with all the threads would not: on 2 busy cores two
  OpenMP threads wait on each other, 7-18x slower than one thread, measured).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import yaml

from benchmarks.measure import ChildRounds, interleaved, load
from handlers.core.jobs import Jobs
from harness import REPO
from harness.torchserve import TorchServeInstance

CONCURRENCY = 8
STEPS = 50
REQUESTS = 48
ROUNDS = 3
CONFIG = REPO / "model_configs/ddpm/cpu.yaml"


def job_tracking_seconds() -> float:
    """Median seconds a worker spends tracking one DDIM-STEPS request by its id (handlers/core/jobs.py):
    the claim and its status at admission, after each step a cancel check and a status write (at
    most every STATUS_EVERY_S, so here the first only), its end record, the release."""
    rid = "bench-request-id"
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as root:
        jobs = Jobs("ddpm", root)

        def track() -> None:
            jobs.claim(rid)
            jobs.report(rid, 0, STEPS, 0.0)
            for step in range(1, STEPS + 1):
                jobs.cancel_requested(rid)
                jobs.report(rid, step, STEPS, 0.1)
            jobs.end(rid, "finished")
            jobs.release(rid)

        return interleaved({"track": track}, repeats=200)["track"]


def raw_worker(threads: int, batch: int, barrier, rates) -> None:
    """One in-process sampler: waits at the barrier, times 3 batches, reports images/s; repeats."""
    from handlers.ddpm.handler import DdpmHandler
    from harness.context import run_batch
    from harness.inprocess import load_handler, unpack

    torch.set_num_threads(threads)
    handler, ctx = load_handler(DdpmHandler, "ddpm", unpack(Path(tempfile.mkdtemp()) / "ddpm", "ddpm",
                                                            REPO / "weights/demo/ddpm"))
    rows = [{"body": {"steps": STEPS, "scheduler": "ddim", "seed": i}} for i in range(batch)]
    run_batch(handler, ctx, rows)  # warm-up
    while True:
        barrier.wait()
        seconds = interleaved({"batch": lambda: run_batch(handler, ctx, rows)}, repeats=3, warmup=0)["batch"]
        rates.put(batch / seconds)


def raw_pool(workers: int, threads: int) -> None:
    """`python -m benchmarks.bench_ddpm WORKERS THREADS`: one round per stdin line; prints
    `images/s <total of all workers>`."""
    spawn = mp.get_context("spawn")
    barrier, rates = spawn.Barrier(workers + 1), spawn.Queue()
    for _ in range(workers):
        spawn.Process(target=raw_worker, args=(threads, CONCURRENCY // workers, barrier, rates),
                      daemon=True).start()
    print("ready", flush=True)
    for _ in sys.stdin:
        barrier.wait()
        print("images/s", sum(rates.get() for _ in range(workers)), flush=True)


def run() -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    workers, threads = config["maxWorkers"], config["handler"]["threads"]
    names = {"batched": ("ddpm", config["batchSize"]), "batch1": ("ddpm_b1", 1)}
    batch_sizes: Counter = Counter()
    load_before = os.getloadavg()[0]
    pool = ChildRounds("benchmarks.bench_ddpm", str(workers), str(threads))
    try:
        with TorchServeInstance(archives=["ddpm.mar"], load_at_start=False) as ts:
            client = ts.client
            for name, batch_size in names.values():
                client.register("ddpm.mar", model_name=name, batch_size=batch_size, max_batch_delay=50,
                                initial_workers=workers)
            client.wait_ready([name for name, _ in names.values()], timeout=180)

            def caller(model: str):
                def call(i: int):
                    resp = client.predict_raw(model, {"steps": STEPS, "scheduler": "ddim", "seed": i})
                    assert resp.status_code == 200, resp.text
                    if model == "ddpm":
                        batch_sizes[int(resp.headers["X-Batch-Size"])] += 1
                return call

            calls = {key: caller(name) for key, (name, _) in names.items()}
            for call in calls.values():
                load(call, CONCURRENCY, CONCURRENCY)  # warm-up
            batch_sizes.clear()
            # Alternate in-process and both served settings so all see the same machine load.
            raw: list[float] = []
            served: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(ROUNDS):
                raw.append(pool.round())
                for key, call in calls.items():
                    served[key].append(load(call, REQUESTS, CONCURRENCY))
    finally:
        pool.close()
    raw_ips = statistics.median(raw)
    batched, single = (statistics.median(served[key]) for key in ("batched", "batch1"))
    track_s = job_tracking_seconds()
    return {
        "batch_size": config["batchSize"],
        "served_workers": workers,
        "threads_per_worker": threads,
        "in_process_images_per_s": round(raw_ips, 1),
        "served_images_per_s_c8": round(batched, 1),
        "served_images_per_s_c8_batch1": round(single, 1),
        "served_requests_by_batch_size": dict(sorted(batch_sizes.items())),
        "batching_speedup": round(batched / single, 2),
        "job_tracking_us_per_request": round(track_s * 1e6, 1),
        # a worker's share of time spent tracking ids, status and cancels at the in-process request rate
        "job_tracking_cost_share": round(track_s * raw_ips / workers, 5),
        "served_over_raw": round(batched / raw_ips, 3),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "goals": {"batching_speedup": ">= 1.8", "served_over_raw": ">= 0.9", "job_tracking_cost_share": "<= 0.02"},
        "notes": [f"DDIM-{STEPS}, 1 image per request, demo UNet (16x16, 1.1 M params)",
                  f"in-process = handler.handle() on {CONCURRENCY} requests at a time: {workers} "
                  f"processes x {threads} thread(s) x batch {CONCURRENCY // workers}, in a session of "
                  "their own like the served workers",
                  "load_average: the machine's 1-minute load (2 cores) before and after: how busy it was",
                  f"in-process, served and served-batch-1 rounds alternate (median of {ROUNDS} each)",
                  f"job_tracking_us_per_request: what tracking one DDIM-{STEPS} request by id costs its worker "
                  "(claim, status, a cancel check per step, end record, release: files in the temp dir), median "
                  "of 200; job_tracking_cost_share: that x in-process requests/s per worker"],
    }


if __name__ == "__main__":
    raw_pool(int(sys.argv[1]), int(sys.argv[2]))
