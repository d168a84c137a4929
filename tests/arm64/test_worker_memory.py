"""Peak memory of the aarch64 workers once the other arm64 tests have run their requests through
them (this file runs last): with each model's configured maxWorkers, plus TorchServe's Java
frontend, it must fit the arm64 target's device, a Raspberry Pi 5 with 8 GB (docs/targets.md).

Memory does not depend on emulation, except that each qemu process adds its translated-code
cache: the figures are an upper bound of the native ones.
"""
from __future__ import annotations

import psutil
import yaml

from deploy.targets import config_path, models
from harness.traffic import peak_rss, worker_pids

DEVICE_BYTES = 8 * 2**30
RESERVED_BYTES = 1 * 2**30  # the OS, its page cache and a console session (docs/targets.md)


def test_workers_fit_a_raspberry_pi_5(served):
    rows = {}
    for model in models():
        workers = yaml.safe_load(config_path(model, "arm64").read_text())["maxWorkers"]
        rows[model] = (max(peak_rss(pid) for pid in worker_pids(served.client, model)), workers)
    java = [p for p in psutil.Process(served.proc.pid).children(recursive=True) if p.name() == "java"]
    assert len(java) == 1
    frontend = peak_rss(java[0].pid)
    total = frontend + sum(peak * workers for peak, workers in rows.values())
    print("\n[arm64] peak RSS under emulation: "
          + ", ".join(f"{m} {peak / 2**20:.0f} MiB x {w} worker(s)" for m, (peak, w) in rows.items())
          + f", frontend {frontend / 2**20:.0f} MiB; total {total / 2**30:.2f} GiB of {DEVICE_BYTES / 2**30:.0f}")
    assert total <= DEVICE_BYTES - RESERVED_BYTES
