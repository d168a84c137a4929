"""Streaming benchmark: what `"stream": true` and its previews cost, against a real TorchServe
serving the demo ddpm and sd15 archives (one request at a time).

- ddpm (DDPM-50, one image): streamed without previews / plain, and with an x0 preview every
  5 steps / plain.
- sd15 (256x256, 20 steps, dpm++): streamed with the linear latent-to-RGB previews every 2 steps
  / plain, and with VAE-decoded previews every 2 steps / plain (what `preview_vae` costs).
- first_event_ms: how long after sending a streaming request its first event (step 0) arrives.

Rounds alternate the variants, each figure is the median over rounds of per-round ratios (the
machine is shared: `load_average` says how busy it was).
"""
from __future__ import annotations

import os
import statistics
import time

from harness.torchserve import TorchServeInstance

ROUNDS = 5
DDPM = {"steps": 50, "scheduler": "ddpm", "seed": 0}
SD15 = {"prompt": "a red handwritten 7", "steps": 20, "width": 256, "height": 256, "scheduler": "dpm++", "seed": 0}
VARIANTS = {
    "ddpm": {"plain": None, "stream": {"preview_every": 0}, "stream_previews": {"preview_every": 5}},
    "sd15": {"plain": None, "stream_approx_previews": {"preview_every": 2},
             "stream_vae_previews": {"preview_every": 2, "preview_vae": True}},
}


def timed(client, model: str, payload: dict, stream: dict | None) -> tuple[float, float | None]:
    """(seconds to the final response, seconds to the first event or None)."""
    started = time.perf_counter()
    if stream is None:
        client.predict(model, payload)
        return time.perf_counter() - started, None
    first = None
    for _ in client.stream(model, {**payload, **stream}):
        first = first if first is not None else time.perf_counter() - started
    return time.perf_counter() - started, first


def run() -> dict:
    load_before = os.getloadavg()[0]
    payloads = {"ddpm": DDPM, "sd15": SD15}
    with TorchServeInstance(archives=["ddpm.mar", "sd15"]) as ts:
        client = ts.client
        for model, payload in payloads.items():  # warm-up
            timed(client, model, payload, None)
        seconds = {m: {v: [] for v in VARIANTS[m]} for m in VARIANTS}
        first_events = []
        for _ in range(ROUNDS):
            for model, variants in VARIANTS.items():
                for name, stream in variants.items():
                    total, first = timed(client, model, payloads[model], stream)
                    seconds[model][name].append(total)
                    if first is not None:
                        first_events.append(first)
    ratio = {}
    for model, variants in seconds.items():
        for name, times in variants.items():
            if name != "plain":
                per_round = [t / p for t, p in zip(times, variants["plain"])]
                ratio[f"{model}.{name}_over_plain"] = round(statistics.median(per_round), 3)
    return {
        **ratio,
        "ddpm.plain_s": round(statistics.median(seconds["ddpm"]["plain"]), 3),
        "sd15.plain_s": round(statistics.median(seconds["sd15"]["plain"]), 3),
        "first_event_ms": round(1000 * statistics.median(first_events), 1),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "goals": {"ddpm.stream_over_plain": "<= 1.1", "sd15.stream_approx_previews_over_plain": "<= 1.1"},
        "notes": [f"one request at a time, median of {ROUNDS} rounds of per-round ratios; ddpm DDPM-50 on "
                  "the 16x16 demo UNet (a step is ~2-5 ms, so a per-step event is a visible share), sd15 "
                  "256x256 dpm++ 20 steps on the demo pipeline",
                  "sd15 VAE previews: one VAE decode per preview (9 for 20 steps at preview_every 2)"],
    }
