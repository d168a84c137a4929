"""Bounded load against a private TorchServe on loopback: mixed requests over every model that has
an archive, at a fixed concurrency; stops by itself after `--requests` requests.

    python -m benchmarks.load [--requests 1000] [--concurrency 32] [--models cam ddpm sd15]

Reports failures, p50/p95/p99 latency per model, throughput, worker restarts (pids that
changed) and worker RSS after request 100 and at the end. Writes benchmarks/results/load.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from benchmarks import RESULTS
from benchmarks.measure import percentile
from harness import REPO
from harness.torchserve import TorchServeInstance
from harness.traffic import rss_mb, valid_payloads, worker_pids

ARCHIVES = {"cam": "cam.mar", "ddpm": "ddpm.mar", "sd15": "sd15"}
# Share of the mix: the diffusion requests are small but still far slower than cam's.
WEIGHTS = {"cam": 6, "ddpm": 1, "sd15": 1}


def available(models: list[str]) -> list[str]:
    return [m for m in models if (REPO / "model_store" / ARCHIVES[m]).exists()]


def run_load(ts: TorchServeInstance, models: list[str], total: int, concurrency: int) -> dict:
    payloads = valid_payloads()
    schedule = [m for m in models for _ in range(WEIGHTS[m])]
    client = ts.make_client(timeout=300, retries=0)
    pids_start = {m: worker_pids(client, m) for m in models}
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, list[str]] = defaultdict(list)
    rss_at_100: list[float] = []
    bar = tqdm(total=total, desc="load", unit="req")

    def one(i: int) -> None:
        model = schedule[i % len(schedule)]
        start = time.perf_counter()
        try:
            resp = client.predict_raw(model, payloads[model])
            ok, why = resp.status_code == 200, f"HTTP {resp.status_code}"
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            ok, why = False, type(exc).__name__
        with lock:
            (latencies[model] if ok else failures[model]).append(
                time.perf_counter() - start if ok else why)
            bar.update()
            if bar.n == 100:
                rss_at_100.append(rss_mb([p for m in models for p in worker_pids(client, m)]))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - start
    bar.close()
    pids_end = {m: worker_pids(client, m) for m in models}
    rss_end = rss_mb([p for m in models for p in pids_end[m]])
    restarts = sum(len(set(pids_start[m]) - set(pids_end[m])) for m in models)
    return {
        "requests": total,
        "concurrency": concurrency,
        "failures": sum(len(f) for f in failures.values()),
        "failure_reasons": {m: sorted(set(f)) for m, f in failures.items()},
        "throughput_rps": round(total / elapsed, 1),
        "per_model": {
            m: {"requests": len(latencies[m]) + len(failures[m]),
                **{f"p{q}_ms": round(percentile(latencies[m], q / 100) * 1000, 1) for q in (50, 95, 99)}}
            for m in models if latencies[m]
        },
        "worker_restarts": restarts,
        "worker_rss_mb_at_100": round(rss_at_100[0], 1) if rss_at_100 else None,
        "worker_rss_mb_end": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end / rss_at_100[0] - 1), 1) if rss_at_100 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--models", nargs="*", default=list(ARCHIVES))
    args = parser.parse_args(argv)
    models = available(args.models)
    if not models:
        raise SystemExit("no archives in model_store/: run ./archive.sh first")
    with TorchServeInstance(archives=[ARCHIVES[m] for m in models]) as ts:
        result = run_load(ts, models, args.requests, args.concurrency)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
