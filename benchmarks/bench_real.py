"""`make bench-real`: the three models at their real sizes, served on the cpu target.

The `realsize` weights set (weights/build_realsize.py: SD1.5, ResNet-50, DDPM-CIFAR10 in their
real architectures, random weights) is archived through the pretrained path (archive.sh with
SD15_WEIGHTS / DDPM_WEIGHTS / CAM_WEIGHTS, cpu target, a store of its own) and served by a real
TorchServe. Measured per model: archive and load time, each worker's peak RSS; sd15 at 512x512
(a 25-step request without streaming: served or refused up front; the same request streamed:
seconds per step, per VAE decode, every progress event); cam images/s at 8 concurrent clients;
ddpm images/s. Then the CPU knobs at real size in-process (benchmarks/real_knobs.py) and the
machine's matmul rate, from which docs/targets.md's arm64 and gpu limits are re-derived.

    python -m benchmarks.bench_real [--report | --resume]   -> benchmarks/results/real-size.{json,md}

Takes 10-15 minutes on the 2-core development machine (the knobs at SD1.5's size are half of it;
float32 UNets make the served part three times longer) and ~10 GB of disk (weights + their copy
in the store). `--report` rewrites the .md from the
.json without measuring; `--resume` measures the knobs on the served figures of a run that stopped
after them (kept in real-size.partial.json).
"""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml
from PIL import Image

from benchmarks import RESULTS, real_knobs
from benchmarks.measure import load
from clients.api import ServerError
from handlers.core.precision import BF16_FLAGS, cpu_flags
from handlers.ddpm.request import DdpmRequest
from handlers.sd15.request import Sd15Request
from harness import REPO
from harness.torchserve import TorchServeInstance
from harness.traffic import peak_rss, worker_pids
from weights.build_realsize import MODELS

JSON = RESULTS / "real-size.json"
REALSIZE = REPO / "weights" / "realsize"
TARGET = "cpu"
SD15_REQUEST = {"prompt": "a lighthouse at dusk, oil painting", "width": 512, "height": 512, "steps": 25,
                "seed": 1, "metadata": False}
SD15_STREAMED = {**SD15_REQUEST, "preview_every": 5}  # approximate previews: no VAE decode
CAM_CONCURRENCY, CAM_REQUESTS = 8, 64
DDPM_REQUEST = {"num_images": 8}  # the model's default steps and scheduler
DDPM_CONCURRENCY, DDPM_REQUESTS = 2, 6
# Every figure the report states (dotted paths into real-size.json): tests/unit/test_real_size_report.py
# checks the committed json against this list.
FIGURES = (
    "machine.cpu", "machine.cores", "machine.memory_gib", "machine.bf16_instructions", "machine.load_average",
    "machine.matmul_gflops_fp32", "machine.matmul_gflops_bf16", "machine.matmul_gflops_fp32_1_thread",
    *(f"{m}.{k}" for m in MODELS for k in ("parameters", "archive_s", "load_s", "startup_timeout_s",
                                           "peak_rss_mib_per_worker", "workers", "config")),
    "sd15.plain_request.status", "sd15.plain_request.answer", "sd15.plain_request.seconds",
    "sd15.response_timeout_s", "sd15.budget_s",
    "sd15.streamed.completed", "sd15.streamed.progress_steps", "sd15.streamed.seconds_per_step",
    "sd15.streamed.vae_decode_s", "sd15.streamed.total_s", "sd15.streamed.previews",
    "sd15.units_per_s", "sd15.effective_gflops",
    "cam.images_per_s_c8", "cam.mean_batch_size", "ddpm.images_per_s", "ddpm.image_steps_per_s",
    "knobs.sd15_unet.speedup", "knobs.sd15_unet.quality", "knobs.sd15_unet.baseline_s", "knobs.ddpm.baseline_s", "knobs.sd15_vae.speedup", "knobs.sd15_vae.quality",
    "knobs.cam.speedup", "knobs.cam.quality", "knobs.ddpm.speedup", "knobs.ddpm.quality",
    "targets.arm64", "targets.gpu", "anchors",
)


def get(results: dict, dotted: str):
    """results['a']['b'] for 'a.b'; KeyError naming the path when a part is missing."""
    value = results
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


# the machine -----------------------------------------------------------------------------------
def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, threads: int, n: int = 2048, calls: int = 5) -> float:
    """The machine's dense fp32 / bf16 rate with `threads` torch threads: the yardstick that scales
    the measured model speeds to other devices (docs/targets.md)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(calls):
        a @ b
    return round(2 * n**3 * calls / (time.perf_counter() - start) / 1e9, 1)


def machine(threads: int) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "bf16_instructions": sorted((cpu_flags() or set()) & BF16_FLAGS),
            "torch": torch.__version__, "threads": threads,
            "matmul_gflops_fp32": matmul_gflops(torch.float32, threads),
            "matmul_gflops_bf16": matmul_gflops(torch.bfloat16, threads),
            "matmul_gflops_fp32_1_thread": matmul_gflops(torch.float32, 1)}


# archive and serve -----------------------------------------------------------------------------
def build_weights(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "weights.build_realsize", "--out", str(root)], cwd=REPO, check=True)


def archive(root: Path, store: Path) -> dict[str, float]:
    """archive.sh per model, through the pretrained profile's <MODEL>_WEIGHTS; seconds each."""
    env = {**os.environ, **{f"{m.upper()}_WEIGHTS": str(root / m) for m in MODELS}}
    seconds = {}
    for model in MODELS:
        start = time.perf_counter()
        subprocess.run([str(REPO / "archive.sh"), "--profile", "pretrained", "--target", TARGET, "--store", str(store),
                        model], cwd=REPO, env=env, check=True)
        seconds[model] = round(time.perf_counter() - start, 1)
    return seconds


def model_config(model: str) -> dict:
    return yaml.safe_load((REPO / "model_configs" / model / f"{TARGET}.yaml").read_text())


def speed_knobs(handler: dict) -> dict:
    """The keys of a config's handler section that decide its speed."""
    keys = ("threads", "dtype_cpu", "unet_dtype_cpu", "torchscript", "quantize", "attention_slicing", "vae_tile_size")
    return {k: handler[k] for k in keys if k in handler}


def register(ts: TorchServeInstance, model: str) -> float:
    """Registers the archive with its yaml's workers and waits for them: seconds to READY."""
    entry = next(p.name for p in ts.store.iterdir() if p.name in (model, f"{model}.mar"))
    start = time.perf_counter()
    ts.client.register(entry, initial_workers=model_config(model)["minWorkers"])
    ts.client.wait_ready([model], timeout=model_config(model)["startupTimeout"])
    return round(time.perf_counter() - start, 1)


def sd15_requests(ts: TorchServeInstance) -> dict:
    config = model_config("sd15")
    plain_start = time.perf_counter()
    resp = ts.client.predict_raw("sd15", SD15_REQUEST)
    body = resp.json()
    plain = {"status": resp.status_code, "seconds": round(time.perf_counter() - plain_start, 1),
             "answer": body.get("error") if resp.status_code != 200 else f"{len(body['images'])} image(s)"}
    events, times, start = [], [], time.perf_counter()
    try:
        for event in ts.client.stream("sd15", SD15_STREAMED):
            events.append(event)
            times.append(time.perf_counter() - start)
            if event["event"] == "progress":
                print(f"  sd15 512x512 step {event['step']}/{event['total']} at {times[-1]:.0f} s", flush=True)
        completed = events[-1]["event"] == "result"
    except ServerError as exc:
        completed, events = False, events + [{"event": "error", "error": str(exc)}]
    steps = [(e["step"], t) for e, t in zip(events, times) if e["event"] == "progress"]
    per_step = [b[1] - a[1] for a, b in zip(steps, steps[1:]) if b[0] == a[0] + 1]
    streamed = {"completed": completed, "progress_steps": [s for s, _ in steps],
                "previews": sum(e["event"] == "preview" for e in events),
                "seconds_per_step": round(statistics.median(per_step), 2) if per_step else None,
                "vae_decode_s": round(times[-1] - steps[-1][1], 1) if completed and steps else None,
                "total_s": round(times[-1], 1) if times else None}
    return {"plain_request": plain, "streamed": streamed,
            "response_timeout_s": config["responseTimeout"],
            "budget_s": round(config["responseTimeout"] * config["handler"]["timeout_margin"])}


def photo_png() -> bytes:
    """One of scikit-learn's two sample photographs (640x427): what a cam client uploads."""
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, format="PNG")
    return buf.getvalue()


def cam_throughput(ts: TorchServeInstance) -> dict:
    png, sizes, lock = photo_png(), [], threading.Lock()

    def call(_: int) -> None:
        resp = ts.client.predict_raw("cam", png)
        assert resp.status_code == 200, resp.text
        with lock:
            sizes.append(int(resp.headers["X-Batch-Size"]))
    load(call, CAM_CONCURRENCY, CAM_CONCURRENCY)  # warm
    sizes.clear()
    rate = load(call, CAM_REQUESTS, CAM_CONCURRENCY)
    return {"images_per_s_c8": round(rate, 2), "mean_batch_size": round(statistics.mean(sizes), 2)}


def ddpm_throughput(ts: TorchServeInstance) -> dict:
    def call(i: int) -> None:
        resp = ts.client.predict_raw("ddpm", {**DDPM_REQUEST, "seed": i})
        assert resp.status_code == 200, resp.text
    call(0)
    rate = load(call, DDPM_REQUESTS, DDPM_CONCURRENCY) * DDPM_REQUEST["num_images"]
    default_steps = DdpmRequest.model_fields["steps"].default
    return {"images_per_s": round(rate, 2), "image_steps_per_s": round(rate * default_steps, 1),
            "request": {**DDPM_REQUEST, "steps": default_steps}}


def serve(root: Path, scratch: Path) -> dict:
    store = scratch / "model_store"
    seconds = archive(root, store)
    results = {m: {"parameters": json.loads((root / m / "realsize.json").read_text())["parameters"],
                   "archive_s": seconds[m], "startup_timeout_s": model_config(m)["startupTimeout"],
                   "config": speed_knobs(model_config(m)["handler"]),
                   "workers": model_config(m)["minWorkers"]} for m in MODELS}
    names = [p.name for p in store.iterdir() if not p.name.startswith(".")]
    with TorchServeInstance(archives=names, source_store=store, load_at_start=False) as ts:
        ts.client = ts.make_client(timeout=1800)
        for model in MODELS:
            print(f"== bench-real: registering {model}", flush=True)
            results[model]["load_s"] = register(ts, model)
        print("== bench-real: sd15 512x512, 25 steps", flush=True)
        results["sd15"].update(sd15_requests(ts))
        print("== bench-real: cam, ddpm", flush=True)
        results["cam"].update(cam_throughput(ts))
        results["ddpm"].update(ddpm_throughput(ts))
        for model in MODELS:
            results[model]["peak_rss_mib_per_worker"] = [round(peak_rss(p) / 2**20) for p in worker_pids(ts.client, model)]
    return results


# the report ------------------------------------------------------------------------------------
def report(r: dict) -> str:
    m = r["machine"]
    sd, st = r["sd15"], r["sd15"]["streamed"]
    lines = ["# Real-size models on the cpu target", "",
             f"Measured {r['date']} by `make bench-real` ({r['duration_min']} min) on {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gib']} GiB, bf16 instructions: {', '.join(m['bf16_instructions']) or 'none'}; torch "
             f"{m['torch']}; load average {m['load_average'][0]} before, {m['load_average'][1]} after. Random weights in "
             "the real architectures (weights/build_realsize.py), archived through the pretrained path and served by "
             "TorchServe with model_configs/*/cpu.yaml. Matmul 2048x2048 with "
             f"{m['threads']} threads: {m['matmul_gflops_fp32']} GFLOP/s fp32, {m['matmul_gflops_bf16']} bf16.", "",
             "## Served", "",
             "| model | parameters | config (speed keys of cpu.yaml) | archive (s) | load to READY (s) | startupTimeout (s) | workers | peak RSS per worker (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        x = r[model]
        params = " + ".join(f"{k} {v / 1e6:.1f} M" for k, v in x["parameters"].items() if k != "vae_sample_size")
        knobs = ", ".join(f"{k}: {v}" for k, v in x["config"].items())
        lines.append(f"| {model} | {params} | {knobs} | {x['archive_s']} | {x['load_s']} | {x['startup_timeout_s']} | "
                     f"{x['workers']} | {', '.join(map(str, x['peak_rss_mib_per_worker']))} |")
    plain = sd["plain_request"]
    lines += ["", "### sd15, 512x512, 25 steps (PNDM, guidance)", "",
              f"* Without streaming: HTTP {plain['status']} after {plain['seconds']} s: {plain['answer']}. "
              f"The time budget is responseTimeout {sd['response_timeout_s']} s x timeout_margin = {sd['budget_s']} s.",
              f"* Streamed (`preview_every: 5`): {'completed' if st['completed'] else 'did NOT complete'} in "
              f"{st['total_s']} s; progress events for steps {compact(st['progress_steps'])}; {st['previews']} previews.",
              f"* {st['seconds_per_step']} s per guided step (UNet batch 2), {st['vae_decode_s']} s from the last step "
              f"to the answer (VAE decode and PNG); {sd['units_per_s']} units/s = {sd['effective_gflops']} GFLOP/s "
              "effective (1.6 TFLOP per unit).",
              "", "### cam and ddpm", "",
              f"* cam (ResNet-50, 224 px): {r['cam']['images_per_s_c8']} images/s with "
              f"{CAM_CONCURRENCY} concurrent clients uploading a 640x427 photograph (mean batch {r['cam']['mean_batch_size']}).",
              f"* ddpm (DDPM-CIFAR10 UNet, 32 px): {r['ddpm']['images_per_s']} images/s, "
              f"{r['ddpm']['image_steps_per_s']} image-steps/s, requests {json.dumps(r['ddpm']['request'])} from "
              f"{DDPM_CONCURRENCY} clients.", ""]
    lines += real_knobs.report(r["knobs"])
    lines += targets_report(r["targets"]) + anchors_report(r["anchors"], sd, m)
    return "\n".join(lines) + "\n"


def compact(steps: list[int]) -> str:
    if steps and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}..{steps[-1]} (all)"
    return ", ".join(map(str, steps)) + " (GAPS)"


# targets: the arm64 and gpu limits re-derived from the measured x86 speed ----------------------
# The devices the arm64 and gpu configs are sized for (docs/targets.md): peak rate in the dtype
# they run, and the share of it a large dense matmul reaches there.
DEVICES = {
    "arm64": {"device": "Raspberry Pi 5 (4x Cortex-A76, 2.4 GHz), fp32", "peak_gflops": 153.6, "dense_share": 0.39,
              "basis": "peak: 4 cores x 2.4 GHz x 16 fp32 FLOP/cycle (two 128-bit NEON FMA pipes); dense share: "
                       "its published HPL run, 30.2 of 76.8 GFLOP/s fp64"},
    "gpu": {"device": "RTX 3090 (the slower of the gpu config's devices), fp16", "peak_gflops": 71_000,
            "dense_share": 0.7, "basis": "peak: fp16 tensor cores with fp32 accumulate; dense share: what "
                                         "large cuBLAS fp16 GEMMs reach (assumed, not measured here)"},
}
# FLOP per unit of work (docs/targets.md): one guided 512x512 SD1.5 step (UNet at batch 2), one
# 32-px DDPM-CIFAR10 image-step; the torch flop counter's figures.
UNIT_GFLOP = {"sd15": 1600, "ddpm": 12.1}


def derive(r: dict) -> None:
    """The figures computed from the measured ones (also by --report): sd15's served units/s and
    effective GFLOP/s (the streamed request's work in the handler's own cost model, over its
    time), and the targets table."""
    st = r["sd15"]["streamed"]
    # The request's fields as sent: its validation needs a served model's context, its cost does not.
    units = Sd15Request.model_construct(**SD15_STREAMED).cost()
    rate = units / st["total_s"] if st["completed"] else None
    r["sd15"]["units_per_s"] = round(rate, 4) if rate else None
    r["sd15"]["effective_gflops"] = round(rate * UNIT_GFLOP["sd15"], 1) if rate else None
    r["targets"] = targets(r)


def model_shares(r: dict) -> dict:
    """Each UNet's float32 rate in the in-process knob baseline (sd15: a guided 512-px call, ddpm:
    8 images), as a share of this machine's float32 matmul rate at the same threads: a property of
    the model's mix of operations, carried over to other devices."""
    m, k = r["machine"], r["knobs"]
    matmul = {2: m["matmul_gflops_fp32"], 1: m["matmul_gflops_fp32_1_thread"]}
    sd15 = UNIT_GFLOP["sd15"] / k["sd15_unet"]["baseline_s"] / matmul[k["threads"]["sd15"]]
    ddpm = 8 * UNIT_GFLOP["ddpm"] / k["ddpm"]["baseline_s"] / matmul[k["threads"]["ddpm"]]
    return {"sd15": round(sd15, 3), "ddpm": round(ddpm, 3)}


def targets(r: dict) -> dict:
    """Per target and diffusion model: the speed its device is predicted to reach (the model's
    measured share of a dense matmul times the device's dense rate), the config's planned speed,
    and what its time budget holds at the prediction."""
    shares = model_shares(r)
    out = {}
    for target, device in DEVICES.items():
        dense = device["peak_gflops"] * device["dense_share"]
        rows = {}
        for model, share in shares.items():
            config = yaml.safe_load((REPO / "model_configs" / model / f"{target}.yaml").read_text())
            predicted = dense * share / UNIT_GFLOP[model]
            budget_s = config["responseTimeout"] * config["handler"]["timeout_margin"]
            rows[model] = {"model_share_of_matmul": share, "predicted_units_per_s": round(predicted, 4),
                           "budget_s": round(budget_s), "budget_units_at_predicted": round(predicted * budget_s, 1)}
        out[target] = {**device, "dense_gflops": round(dense, 1), **rows}
    return out


def targets_report(t: dict) -> list[str]:
    lines = ["## The arm64 and gpu limits from these measurements", "",
             "A model's speed on another device is predicted as its share of a dense matmul's rate, measured "
             "here in float32 (the in-process knob baselines above against this machine's matmul at the same "
             "threads), times the device's dense rate (its peak times the share of peak a dense matmul reaches "
             "there). Units: sd15 one guided 512x512 step (1.6 TFLOP), ddpm one 32-px image-step (12.1 GFLOP). "
             "The budget is responseTimeout x timeout_margin of the target's config; docs/targets.md compares "
             "the configs' planned speeds with these.", "",
             "| target | device | dense GFLOP/s | model | model's share of matmul | predicted units/s | budget (s) | units the budget holds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, x in t.items():
        for model in UNIT_GFLOP:
            row = x[model]
            lines.append(f"| {name} | {x['device']} | {x['dense_gflops']} | {model} | {row['model_share_of_matmul']} | "
                         f"{row['predicted_units_per_s']} | {row['budget_s']} | {row['budget_units_at_predicted']} |")
    lines += [""] + [f"* {name}: {x['basis']}." for name, x in t.items()]
    return lines + [""]


# Published CPU latencies people compare SD on a CPU with (FastSD CPU, OpenVINO): few-step
# distilled models, 512x512, on a 12-core desktop CPU.
ANCHORS = [
    {"what": "FastSD CPU, LCM Dreamshaper v7, OpenVINO", "steps": 4, "guidance": False, "seconds": 10,
     "machine": "Intel Core i7", "source": "https://nolowiz.com/fast-stable-diffusion-on-cpu-using-fastsd-cpu-and-openvino/"},
    {"what": "FastSD CPU, LCM Dreamshaper v7, PyTorch", "steps": 4, "guidance": False, "seconds": 20,
     "machine": "Intel Core i7", "source": "https://nolowiz.com/fast-stable-diffusion-on-cpu-using-fastsd-cpu-and-openvino/"},
    {"what": "FastSD CPU, SD Turbo, OpenVINO + TAESD", "steps": 1, "guidance": False, "seconds": 1.7,
     "machine": "Intel Core i7-12700 (12 cores)",
     "source": "https://ai-suka.pages.dev/2026/04/07-fastsdcpu-cpu-image-generation-without-gpu"},
]


def anchors_report(anchors: list[dict], sd: dict, m: dict) -> list[str]:
    lines = ["## Beside the CPU anchors people use", "",
             f"This project's sd15 on the cpu target: {sd['streamed']['total_s']} s for a 512x512 image at 25 guided "
             f"steps (UNet batch 2 per step) on {m['cores']} cores.", "",
             "| pipeline | steps | guidance (UNet calls per step) | seconds per 512x512 image | machine | source |",
             "|---|---|---|---|---|---|"]
    for a in anchors:
        lines.append(f"| {a['what']} | {a['steps']} | {'2' if a['guidance'] else '1'} | {a['seconds']} | "
                     f"{a['machine']} | {a['source']} |")
    lines += ["", "The difference in steps: distilled models need 1-4 UNet calls of batch 1 for an image, SD1.5 "
              "with PNDM 25 steps of batch 2 (50 image-calls): the same UNet architecture, 12-50x the calls. A "
              "distilled checkpoint in SD1.5's layout (an LCM-distilled SD1.5) is served by this sd15 archive too, "
              "with few steps; this project does not ship one.", ""]
    return lines


def run(resume: bool = False) -> dict:
    """Everything, or with `resume` the knobs and what follows on the served figures of a run that
    stopped after them (real-size.partial.json)."""
    partial = JSON.with_suffix(".partial.json")
    if resume:
        results = json.loads(partial.read_text())
    else:
        started = time.perf_counter()
        threads = model_config("sd15")["handler"]["threads"]
        results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(threads)}
        results["machine"]["load_average"] = [round(os.getloadavg()[0], 1)]  # before; after is appended
        build_weights(REALSIZE)
        scratch = Path(tempfile.mkdtemp(prefix="bench-real-"))
        try:
            results.update(serve(REALSIZE, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results["served_min"] = round((time.perf_counter() - started) / 60, 1)
        partial.write_text(json.dumps(results, indent=2) + "\n")
    print("== bench-real: CPU knobs at real size", flush=True)
    started = time.perf_counter()
    results["knobs"] = real_knobs.measure(REALSIZE)
    results["anchors"] = ANCHORS
    results["machine"]["load_average"].append(round(os.getloadavg()[0], 1))
    results["duration_min"] = round(results["served_min"] + (time.perf_counter() - started) / 60, 1)
    partial.unlink(missing_ok=True)
    return results


def main(argv: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    if argv == ["--report"]:
        results = json.loads(JSON.read_text())
    else:
        results = run(resume=argv == ["--resume"])
    derive(results)
    JSON.write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (RESULTS / "real-size.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
