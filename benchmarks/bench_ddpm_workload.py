"""ddpm under a mixed open-loop workload: static batching (the `cpu` target) vs step-level
(continuous) batching (the `cpu-step` target), the archive built by archive.sh for each, served by
ONE private TorchServe and measured in alternating rounds (the machine is shared and noisy).

Workload (fixed seed): Poisson arrivals at 60 %, 90 % and 130 % of the static server's capacity
measured at the start of the run (loaded; queueing; more than static can serve); steps from
{10, 25, 50}, scheduler from all five, num_images 1-4, eta from {0, 0.5, 1} for ddim; every
request seeded. Latency is counted from the scheduled arrival time (open loop: a slow server does
not slow the arrivals).

- open loop, per rate: p50/p95 latency and throughput (images / (last answer - first arrival))
  per mode.
- capacity: the same request list sent at once (every request queued at t=0), images/s: what each
  mode serves when it is never idle; the step-level figure / static's is the throughput gain.
- served_over_raw (step-level): the capacity figure / the handler's own step loop in-process on
  the same request list (the cpu-step config's batch size and threads, in a process session of
  its own like the served worker, alternated with the served rounds).

    python -m benchmarks.run ddpm_workload      (or python -m benchmarks.bench_ddpm_workload)
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.measure import ChildRounds, percentile
from harness import REPO
from harness.torchserve import TorchServeInstance

REQUESTS = 120  # per open-loop round (~15-30 s of arrivals; the p95 is the 6th-slowest)
CAPACITY_REQUESTS = 40
ROUNDS = 3
SEED = 14
STEPS = (10, 25, 50)
SCHEDULERS = ("ddim", "ddpm", "dpm++", "unipc", "euler")
TARGETS = {"ddpm_static": "cpu", "ddpm_step": "cpu-step"}  # served model name: archive.sh target
STATIC_CONFIG = REPO / "model_configs/ddpm/cpu.yaml"
STEP_CONFIG = REPO / "model_configs/ddpm/cpu-step.yaml"
UTILISATIONS = (0.6, 0.9, 1.3)  # arrival rates, as shares of the static server's capacity in the same run


def workload(n: int, rate: float, seed: int = SEED) -> list[tuple[float, dict]]:
    """(arrival time in s, request body) for n requests with Poisson arrivals."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        scheduler = rng.choice(SCHEDULERS)
        body = {"steps": rng.choice(STEPS), "scheduler": scheduler, "num_images": rng.randint(1, 4),
                "seed": rng.randrange(2**31)}
        if scheduler == "ddim":
            body["eta"] = rng.choice((0.0, 0.5, 1.0))
        out.append((t, body))
        t += rng.expovariate(rate)
    return out


def configs() -> dict[str, dict]:
    """The two shipped cpu configs: cpu.yaml (static batching, 2 workers x 1 thread, batchSize 4)
    and cpu-step.yaml (continuousBatching, 1 worker x 1 thread, why: that file's comments)."""
    static = yaml.safe_load(STATIC_CONFIG.read_text())
    step = yaml.safe_load(STEP_CONFIG.read_text())
    assert not static.get("continuousBatching") and step.get("continuousBatching")
    return {"ddpm_static": static, "ddpm_step": step}


def build_store(root: Path) -> Path:
    """Both archives, by archive.sh --target, under the names the benchmark serves them."""
    store = root / "store"
    store.mkdir()
    for name, target in TARGETS.items():
        subprocess.run([str(REPO / "archive.sh"), "--target", target, "--store", str(store), "--name", name, "ddpm"],
                       check=True, capture_output=True)
    return store


def open_loop(client, model: str, plan: list[tuple[float, dict]]) -> dict:
    """Sends each request at its arrival time; latencies from the scheduled arrival (also the p95
    per `steps` value: where the tail comes from)."""
    lat, images, errors = [], 0, 0
    by_steps: dict[int, list[float]] = {}
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    ends = []

    def one(item):
        nonlocal images, errors
        at, body = item
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        resp = client.predict_raw(model, body)
        end = time.perf_counter()
        with lock:
            if resp.status_code == 200:
                lat.append(end - (start + at))
                by_steps.setdefault(body["steps"], []).append(lat[-1])
                images += body["num_images"]
            else:
                errors += 1
            ends.append(end)

    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(one, plan))
    return {"p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
            "images_per_s": images / (max(ends) - start), "errors": errors,
            **{f"p95_s_steps_{k}": percentile(v, 0.95) for k, v in sorted(by_steps.items())}}


def burst(client, model: str, bodies: list[dict]) -> float:
    """Every request at once: images/s until the last answer."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = list(pool.map(lambda b: client.predict_raw(model, b).status_code, bodies))
    assert codes == [200] * len(bodies), codes
    return sum(b["num_images"] for b in bodies) / (time.perf_counter() - start)


# in-process step loop ------------------------------------------------------------------------
def raw_step_loop() -> None:
    """`python -m benchmarks.bench_ddpm_workload raw`: the step-level handler (cpu-step config)
    in-process on the capacity request list, driven like TorchServe's continuous batching (queued
    requests fill free slots at each step); prints `images/s X` per stdin line."""
    import torch

    from handlers.ddpm.handler import DdpmHandler
    from harness.inprocess import load_handler

    cfg = configs()["ddpm_step"]
    batch = cfg["batchSize"]
    torch.set_num_threads(cfg["handler"]["threads"])
    model_dir = Path(tempfile.mkdtemp()) / "ddpm"
    model_dir.mkdir()
    (model_dir / "weights").symlink_to((REPO / "weights/demo/ddpm").resolve())
    (model_dir / "cpu.yaml").write_text(yaml.safe_dump(cfg))
    handler, ctx = load_handler(DdpmHandler, "ddpm", model_dir)
    bodies = [b for _, b in workload(CAPACITY_REQUESTS, 1.0)]

    def run() -> float:
        queue = [(f"r{i}", {"body": b}) for i, b in enumerate(bodies)]
        live: list[str] = []
        start = time.perf_counter()
        while queue or live:
            arrivals, queue = queue[: batch - len(live)], queue[batch - len(live):]
            rids = live + [r for r, _ in arrivals]
            ctx.new_batch([{} for _ in rids])
            ctx.request_ids = dict(enumerate(rids))
            ret = handler.handle([{} for _ in live] + [row for _, row in arrivals], ctx)
            live = [rid for idx, rid in enumerate(rids) if ctx.stopping_criteria[idx](ret[idx]) is False]
        return sum(b["num_images"] for b in bodies) / (time.perf_counter() - start)

    run()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print("images/s", run(), flush=True)


def run(requests: int = REQUESTS, rounds: int = ROUNDS) -> dict:
    cfgs = configs()
    bodies = [b for _, b in workload(CAPACITY_REQUESTS, 1.0)]
    mean_images = statistics.mean(b["num_images"] for _, b in workload(requests, 1.0))
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-ddpm-workload-"))
    store = build_store(root)
    raw = ChildRounds("benchmarks.bench_ddpm_workload", "raw")
    res: dict[str, dict[str, list[float]]] = {m: {} for m in cfgs}  # capacity
    loop: dict[float, dict[str, dict[str, list[float]]]] = {u: {m: {} for m in cfgs} for u in UTILISATIONS}
    raw_ips: list[float] = []
    loads = []
    try:
        with TorchServeInstance(archives=[f"{m}.mar" for m in cfgs], source_store=store) as ts:
            client = ts.make_client(timeout=600, retries=0)
            for m in cfgs:  # warm-up
                burst(client, m, bodies[:4])
            # The arrival rates: shares of what the static server serves right now (the
            # machine's load moves it 2x between runs).
            static_now = burst(client, "ddpm_static", bodies)
            rates = {u: round(u * static_now / mean_images, 2) for u in UTILISATIONS}
            for r in range(rounds):
                for m in (("ddpm_static", "ddpm_step") if r % 2 == 0 else ("ddpm_step", "ddpm_static")):
                    for u, rate in rates.items():
                        for key, value in open_loop(client, m, workload(requests, rate)).items():
                            loop[u][m].setdefault(key, []).append(value)
                    res[m].setdefault("capacity", []).append(burst(client, m, bodies))
                    loads.append(os.getloadavg()[0])
                raw_ips.append(raw.round())
    finally:
        raw.close()
        shutil.rmtree(root, ignore_errors=True)
    cap = {m: statistics.median(r["capacity"]) for m, r in res.items()}

    def open_loop_figures(u: float) -> dict:
        med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in loop[u].items()}
        s, t = med["ddpm_static"], med["ddpm_step"]
        mode = lambda x: {k: round(v, 2) for k, v in x.items()}  # noqa: E731
        return {"rate_requests_per_s": rates[u], "offered_images_per_s": round(rates[u] * mean_images, 2),
                "static": mode(s), "step": mode(t),
                "p50_step_over_static": round(t["p50_s"] / s["p50_s"], 2),
                "p95_step_over_static": round(t["p95_s"] / s["p95_s"], 2),
                "throughput_step_over_static": round(t["images_per_s"] / s["images_per_s"], 2)}

    by_rate = {f"{u:.0%}": open_loop_figures(u) for u in UTILISATIONS}
    return {
        "static_capacity_at_calibration": round(static_now, 2),
        "requests_per_round": requests,
        "mean_image_steps_per_request": round(statistics.mean(b["steps"] * b["num_images"]
                                                              for _, b in workload(requests, 1.0)), 1),
        "open_loop": by_rate,
        "p95_step_over_static": by_rate["60%"]["p95_step_over_static"],
        "p95_step_over_static_at_90pct": by_rate["90%"]["p95_step_over_static"],
        "open_loop_throughput_step_over_static": by_rate["130%"]["throughput_step_over_static"],
        "capacity_images_per_s": {"static": round(cap["ddpm_static"], 2), "step": round(cap["ddpm_step"], 2)},
        "capacity_step_over_static": round(cap["ddpm_step"] / cap["ddpm_static"], 2),
        "in_process_step_images_per_s": round(statistics.median(raw_ips), 2),
        "served_over_raw": round(cap["ddpm_step"] / statistics.median(raw_ips), 3),
        "load_average": [round(load_before[0], 1)] + [round(x, 1) for x in loads],
        "configs": {m: {k: c[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")}
                    | {"threads": c["handler"]["threads"], "continuousBatching": bool(c.get("continuousBatching"))}
                    | {k: c["handler"][k] for k in ("step_slice_ms", "unet_lanes", "torchscript") if k in c["handler"]}
                    for m, c in cfgs.items()},
        "goals": {"p95_step_over_static": "<= 0.6", "capacity_step_over_static": ">= 1.2",
                  "open_loop_throughput_step_over_static": ">= 1.2 (at 130 %: below saturation both serve what arrives)",
                  "served_over_raw": ">= 0.9"},
        "notes": [f"open loop: Poisson arrivals (seed {SEED}) at {', '.join(by_rate)} of the static server's "
                  f"capacity measured at the start of this run, {requests} requests per round; steps {STEPS}, all five "
                  "schedulers, num_images 1-4, ddim eta 0/0.5/1; latency from the scheduled arrival",
                  f"capacity: {CAPACITY_REQUESTS} requests of the same mix sent at once; in-process: the same list "
                  "through handle() in continuous mode with the cpu-step config, in a session of its own",
                  f"static = model_configs/ddpm/cpu.yaml, step = cpu-step.yaml; modes alternate in each of {rounds} "
                  "rounds (medians); demo UNet 16x16",
                  "load_average: 1-minute load of the 2-core machine at the start and after each measurement"],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw"]:
        raw_step_loop()
    else:
        import json

        print(json.dumps(run(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])}), indent=2))
