"""Cancel benchmark: how fast a cancel (the `jobs` archive, docs/jobs.md) stops a running request
and how much worker time it frees, against a real TorchServe serving the demo archives: ddpm with
static batching, ddpm on its step-level target (`ddpm_step`) and sd15.

Per model and round: one request run to its end (its seconds per step), then the same request
cancelled once its status says it is past a fifth of its steps:

- cancel_latency_s: from sending the cancel to the cancelled answer;
- cancel_latency_steps: that over the model's seconds per step (how many steps ran after the
  cancel was sent; a cancel lands after the step in flight, so about 1 is the floor);
- freed_share: the share of the request's whole run the cancel saved its worker.

What tracking ids, status and cancels costs every request is measured by the ddpm bench
(`job_tracking_cost_share`). Medians over ROUNDS; `load_average` says how busy the machine was.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from clients.api import ServerError
from harness.torchserve import TorchServeInstance, run_archive_sh

ROUNDS = 3
REQUESTS = {
    "ddpm": {"steps": 1000, "num_images": 8, "seed": 0},
    "ddpm_step": {"steps": 1000, "num_images": 8, "seed": 0},
    "sd15": {"prompt": "a red handwritten 7", "steps": 40, "width": 192, "height": 192, "seed": 0},
}


def one_round(client, model: str, body: dict, tag: str) -> dict:
    started = time.perf_counter()
    client.predict(model, {**body, "request_id": f"bench-full-{tag}"})
    full_s = time.perf_counter() - started
    rid = f"bench-cancel-{tag}"
    answered: dict = {}
    started = time.perf_counter()
    thread = threading.Thread(
        target=lambda: answered.setdefault("resp", client.predict_raw(model, {**body, "request_id": rid})))
    thread.start()
    while True:
        try:
            record = client.job_status(model, rid)
            if record["state"] == "running" and record["step"] >= record["total"] // 5:
                break
        except ServerError:
            pass
        time.sleep(0.01)
    cancel_at = time.perf_counter()
    client.cancel(model, rid)
    thread.join()
    done = time.perf_counter()
    body_out = answered["resp"].json()
    assert body_out.get("cancelled"), body_out
    per_step = full_s / body_out["total"]
    return {"latency_s": done - cancel_at, "latency_steps": (done - cancel_at) / per_step,
            "freed_share": 1 - (done - started) / full_s, "stopped_at_step": body_out["stopped_at_step"],
            "total": body_out["total"]}


def run() -> dict:
    load_before = os.getloadavg()[0]
    store = Path(tempfile.mkdtemp(prefix="bench-jobs-store-"))
    for args in (("ddpm", "sd15"), ("--target", "cpu-step", "--name", "ddpm_step", "ddpm")):
        run_archive_sh("--store", str(store), *args).check_returncode()
    out: dict = {}
    with TorchServeInstance(archives=["ddpm.mar", "ddpm_step.mar", "sd15", "jobs.mar"], source_store=store) as ts:
        ts.client.wait_ready(list(REQUESTS) + ["jobs"], timeout=300)
        rounds = {m: [one_round(ts.client, m, body, f"{m.replace('_', '-')}-{i}") for i in range(ROUNDS)]
                  for m, body in REQUESTS.items()}
    for model, rs in rounds.items():
        for key in ("latency_s", "latency_steps", "freed_share"):
            out[f"{model}_cancel_{key}"] = round(statistics.median(r[key] for r in rs), 3)
    out["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    out["goals"] = {f"{m}_cancel_latency_steps": "<= 2 (the step in flight, and the answer's own time)" for m in REQUESTS}
    out["notes"] = [f"{m}: {body}" for m, body in REQUESTS.items()] + [
        f"median of {ROUNDS} rounds; each round runs the request whole once (seconds per step), then cancels it "
        "once its status is past a fifth of its steps",
        "sd15 with a group of one: its loop stops at once; a request cancelled inside a group of several finishes "
        "with its group (docs/jobs.md)"]
    return out
