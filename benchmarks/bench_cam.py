"""cam benchmark: CAM cost over classification alone, int8 over float32, served vs. in-process
throughput, where a request's time goes, latency. The cpu config's precision (int8) is `cam`;
`cam_fp32` is the same archive built with `quantize: null` (MODEL_CONFIGS), served beside it.

- cam_cost_ratio: time of (classification + fast CAM) / time of classification alone, same batch
  of preprocessed tensors, in-process, in the config's precision. gradcam_library_cost_ratio: the
  same for pytorch-grad-cam's GradCAM (backward pass, float32), for comparison.
- int8_over_fp32_forward_cam: float32's forward + CAM time / int8's, batch 8, in-process.
- served_int8_over_fp32: images/s of cam / cam_fp32, both served at concurrency 16, rounds
  alternating.
- stages_ms: one batch of 8 PNG requests through the handler's stages, per precision: decode
  (parse), preprocess (crop, tensor), forward + CAM, map upsampling, answer (overlay PNG, JSON).
- served_over_raw: throughput of a real TorchServe at concurrency 16 (archive's batch size) /
  throughput of the handler's own handle() in-process on batches of that size, given the CPU
  threads of all served workers together (the same CPU budget).
- latency at concurrency 1 through the server.
- watch_fps: frames/s of a live stream through clients.watch's own reader and sender (48 held-out
  digits at 64 px as an animated GIF, JSON requests with the overlay as `python -m clients.watch`
  sends them), per precision (cam, cam_fp32) at 1 and 4 frames in flight; median of the rounds.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import yaml
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from benchmarks.measure import KeepAlivePoster, interleaved, latency_ms, load
from clients.watch import Frame, read_frames, send_frames
from handlers.cam.handler import CamHandler
from handlers.cam.model import upsample_maps
from handlers.core.batch import Group, Pending
from harness import REPO
from harness.context import run_batch
from harness.inprocess import load_handler, png_bytes, unpack
from harness.torchserve import TorchServeInstance
from weights import digits

CONCURRENCY = 16
ROUNDS = 3
SERVED_REQUESTS = 24 * CONCURRENCY  # per served round
WATCH_FRAMES = 48
WATCH_IN_FLIGHT = (1, 4)
WATCH_PARAMS = {"topk": 1, "method": "gradcam"}  # what `python -m clients.watch` sends by default


def store_with_fp32(config: dict) -> Path:
    """A model store holding model_store/cam.mar and cam_fp32.mar: archive.sh with the cpu config,
    `quantize: null`."""
    root = Path(tempfile.mkdtemp(prefix="cam-fp32-"))
    (root / "configs" / "cam").mkdir(parents=True)
    (root / "configs" / "cam" / "cpu.yaml").write_text(yaml.safe_dump(
        {**config, "handler": {**config["handler"], "quantize": None}}))
    subprocess.run([str(REPO / "archive.sh"), "--name", "cam_fp32", "--store", str(root / "store"), "cam"],
                   env={**os.environ, "MODEL_CONFIGS": str(root / "configs")}, check=True, capture_output=True)
    (root / "store" / "cam.mar").symlink_to(REPO / "model_store" / "cam.mar")
    return root / "store"


def stages_ms(model, pngs: list[bytes]) -> dict:
    """Median ms of each stage of one batch of PNG requests (the order run_group and respond use)."""
    def parse():
        return [Pending(i, model.parse(p)) for i, p in enumerate(pngs)]

    pendings = parse()
    group = Group(shared=pendings[0].params.shared(), requests=pendings)
    shown, batch = model.preprocess(group.per_image("decoded"))
    probs, chosen, maps = model.fast_cam(batch, group.per_image("target"))
    full = upsample_maps(maps, tuple(batch.shape[-2:])).numpy()
    results = [(shown[i], probs[i], int(chosen[i]), maps[i], full[i]) for i in range(len(pngs))]
    t = interleaved({
        "decode": parse,
        "preprocess": lambda: model.preprocess(group.per_image("decoded")),
        "forward_cam": lambda: model.fast_cam(batch, group.per_image("target")),
        "upsample": lambda: upsample_maps(maps, tuple(batch.shape[-2:])).numpy(),
        "answer": lambda: [model.respond(p, [r]) for p, r in zip(pendings, results)],
    }, repeats=9)
    return {k: round(v * 1000, 2) for k, v in t.items()}


def watch_frames(folder: Path) -> list[Frame]:
    """WATCH_FRAMES held-out digits at 64 px written as an animated GIF, read back frame by frame by
    clients.watch's reader (as `python -m clients.watch digits.gif` would)."""
    images, _ = digits.load_arrays()
    _, test = digits.split_indices()
    pils = [digits.to_pil(images[i], 64) for i in test[:WATCH_FRAMES]]
    gif = folder / "digits.gif"
    pils[0].save(gif, save_all=True, append_images=pils[1:], duration=40, loop=0)
    frames = read_frames(gif)
    assert len(frames) == WATCH_FRAMES, len(frames)  # a GIF merges identical consecutive frames
    return frames


def watch_fps(client, frames: list[Frame]) -> dict:
    """Median frames/s of each model at each WATCH_IN_FLIGHT, rounds alternating all of them."""
    models = {"int8": "cam", "fp32": "cam_fp32"}
    rates: dict = {p: {n: [] for n in WATCH_IN_FLIGHT} for p in models}
    for model in models.values():  # warm-up of the JSON + overlay path
        send_frames(client, model, frames[:8], max(WATCH_IN_FLIGHT), params=WATCH_PARAMS)
    for _ in range(ROUNDS):
        for precision, model in models.items():
            for in_flight in WATCH_IN_FLIGHT:
                answers, elapsed = send_frames(client, model, frames, in_flight, params=WATCH_PARAMS)
                assert all(isinstance(a, dict) for a in answers), [str(a) for a in answers if not isinstance(a, dict)]
                rates[precision][in_flight].append(len(frames) / elapsed)
    return {p: {str(n): round(statistics.median(r), 1) for n, r in by_n.items()} for p, by_n in rates.items()}


def run() -> dict:
    config = yaml.safe_load((REPO / "model_configs/cam/cpu.yaml").read_text())
    batch_size = config["batchSize"]
    handler, ctx = load_handler(CamHandler, "cam", unpack(Path(tempfile.mkdtemp()) / "cam", "cam",
                                                          REPO / "weights/demo/cam"))
    fp32, _ = load_handler(CamHandler, "cam", unpack(Path(tempfile.mkdtemp()) / "cam", "cam", REPO / "weights/demo/cam",
                                                     handler_overrides={"quantize": None}))
    # In-process gets the CPU threads all served workers have together: same CPU budget.
    cpu_threads = config["maxWorkers"] * config["handler"]["threads"]
    torch.set_num_threads(cpu_threads)
    images, _ = digits.load_arrays()
    pngs = [png_bytes(digits.to_pil(im, 64)) for im in images[:batch_size]]
    _, batch = handler.model.preprocess([digits.to_pil(im, 64) for im in images[:batch_size]])
    targets = [None] * batch_size
    gradcam = GradCAM(model=handler.model.net, target_layers=[handler.model.net.layer4])
    gc_targets = [ClassifierOutputTarget(0)] * batch_size
    t = interleaved({
        "classify": lambda: handler.model.classify(batch),
        "fast_cam": lambda: handler.model.fast_cam(batch, targets),
        "fast_cam_fp32": lambda: fp32.model.fast_cam(batch, targets),
        "gradcam_library": lambda: gradcam(input_tensor=batch, targets=gc_targets),
    }, repeats=15)
    stages = {handler.model.precision: stages_ms(handler.model, pngs), "float32": stages_ms(fp32.model, pngs)}
    rows = [{"body": p} for p in pngs]

    with TorchServeInstance(archives=["cam.mar", "cam_fp32.mar"], source_store=store_with_fp32(config)) as ts:
        client = ts.client
        poster = KeepAlivePoster(ts.url("inference"), client.keys.inference)
        batch_sizes: Counter = Counter()

        def caller(model: str, count: bool = False):
            def call(i: int):
                status, headers, body = poster.post(f"/predictions/{model}", pngs[i % len(pngs)])
                assert status == 200, body
                if count:
                    batch_sizes[int(headers["X-Batch-Size"])] += 1
            return call

        for model in ("cam", "cam_fp32"):
            load(caller(model), 2 * CONCURRENCY, CONCURRENCY)  # warm-up
        # Alternate in-process and served rounds so all see the same machine load.
        raw, served, served_fp32 = [], [], []
        for _ in range(ROUNDS):
            raw.append(batch_size / interleaved({"handle": lambda: run_batch(handler, ctx, rows)},
                                                repeats=24, warmup=1)["handle"])
            served.append(load(caller("cam", count=True), SERVED_REQUESTS, CONCURRENCY))
            served_fp32.append(load(caller("cam_fp32"), SERVED_REQUESTS, CONCURRENCY))
        raw_ips, served_ips = statistics.median(raw), statistics.median(served)
        served_batches = dict(sorted(batch_sizes.items()))
        lat = latency_ms(lambda: caller("cam")(0), 40)
        with tempfile.TemporaryDirectory(prefix="cam-watch-") as tmp:
            watch = watch_fps(client, watch_frames(Path(tmp)))

    return {
        "batch_size": batch_size,
        "precision": handler.model.precision,
        "served_workers": config["maxWorkers"],
        "in_process_threads": cpu_threads,
        "cam_cost_ratio": round(t["fast_cam"] / t["classify"], 3),
        "gradcam_library_cost_ratio": round(t["gradcam_library"] / t["classify"], 3),
        "classify_batch_ms": round(t["classify"] * 1000, 1),
        "int8_over_fp32_forward_cam": round(t["fast_cam_fp32"] / t["fast_cam"], 2),
        "stages_ms": stages,
        "in_process_images_per_s": round(raw_ips, 1),
        "served_images_per_s_c16": round(served_ips, 1),
        "served_fp32_images_per_s_c16": round(statistics.median(served_fp32), 1),
        "served_int8_over_fp32": round(served_ips / statistics.median(served_fp32), 2),
        "served_over_raw": round(served_ips / raw_ips, 3),
        "served_requests_by_batch_size": served_batches,
        "latency_c1": lat,
        "watch_fps": watch,
        "goals": {"cam_cost_ratio": "<= 1.05", "served_over_raw": ">= 0.9",
                  "int8_over_fp32_forward_cam": ">= 3", "served_int8_over_fp32": ">= 2"},
        "notes": ["in-process throughput = handler.handle() on a batch of PNG requests "
                  "(decode, preprocess, forward+CAM, overlay PNG, JSON), same batch size as served, "
                  "with as many torch threads as the served workers have together",
                  "in-process and served rounds alternate (median of 3 each) so all see the same load",
                  "served load: PNG bodies over one keep-alive http.client connection per client thread "
                  "(benchmarks.measure.KeepAlivePoster), the lightest load generator on the server's own cores",
                  "cam_fp32: the same archive with quantize: null, served by the same TorchServe",
                  f"watch_fps: frames/s of {WATCH_FRAMES} held-out digits (64 px, an animated GIF) sent by "
                  "clients.watch's sender (JSON with the overlay, answers in frame order), by precision and "
                  f"frames in flight ({', '.join(map(str, WATCH_IN_FLIGHT))}); median of {ROUNDS} alternating rounds"],
    }
