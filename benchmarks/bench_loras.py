"""LoRAs per request (sd15 demo pipeline, 64x64, 10 steps, in-process handler with the cpu target's
yaml and a LoRA folder of random rank-4 and rank-16 LoRAs of the UNet and text encoder):

- load_ms_rank4 / load_ms_rank16: a request's extra time when its LoRA is not loaded yet (the
  first request naming it: reading the file and adding its layers), over a cached one.
- lora_over_base_1 / lora_over_base_2: a request's time with one / two cached LoRAs over the
  same request without (unfused adapters add their low-rank products at every layer they touch,
  every step).
- switch_over_base: requests alternating between two LoRA sets (set_adapters each time) over
  plain requests.
- loaded_mb_rank4 / loaded_mb_rank16: what each takes in the cache (float32).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.measure import interleaved
from handlers.sd15.handler import Sd15Handler
from harness import REPO
from harness.context import run_batch
from harness.inprocess import load_handler, unpack
from harness.loras import random_lora

REQ = {"prompt": "a red handwritten 7", "steps": 10, "width": 64, "height": 64, "seed": 0}
REPEATS = 15


def run() -> dict:
    load_before = os.getloadavg()[0]
    weights = REPO / "weights/demo/sd15"
    scratch = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    folder = scratch / "loras"
    for name, rank, seed in (("a4", 4, 1), ("b4", 4, 2), ("a16", 16, 3)):
        random_lora(weights, folder / f"{name}.safetensors", seed=seed, rank=rank, text_encoder=True)
    handler, ctx = load_handler(Sd15Handler, "sd15", unpack(scratch / "model", "sd15", weights,
                                                            handler_overrides={"lora_dir": str(folder)}))
    library = handler.model.loras

    def ask(*names: str):
        def call():
            run_batch(handler, ctx, [{"body": {**REQ, "loras": [{"name": n} for n in names]}}])
            assert ctx.status(0) == 200
        return call

    def first_use(name: str):
        def call():
            if library.loaded.pop(name, None) is not None:
                handler.model.pipes["txt2img"].delete_adapters([name])
            ask(name)()
        return call

    sizes = library.usable()
    flip = iter(range(10**6))
    t = interleaved({"base": ask(), "one": ask("a4"), "two": ask("a4", "b4"),
                     "switch": lambda: ask("a4" if next(flip) % 2 else "b4")(),
                     "first4": first_use("a4"), "cached4": ask("a4"),
                     "first16": first_use("a16"), "cached16": ask("a16")}, repeats=REPEATS, warmup=2)
    return {
        "base_request_ms": round(t["base"] * 1000, 1),
        "load_ms_rank4": round((t["first4"] - t["cached4"]) * 1000, 1),
        "load_ms_rank16": round((t["first16"] - t["cached16"]) * 1000, 1),
        "lora_over_base_1": round(t["one"] / t["base"], 3),
        "lora_over_base_2": round(t["two"] / t["base"], 3),
        "switch_over_base": round(t["switch"] / t["base"], 3),
        "loaded_mb_rank4": round(sizes["a4"] / 2**20, 3),
        "loaded_mb_rank16": round(sizes["a16"] / 2**20, 3),
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "notes": ["demo pipeline: its layers are small, so a LoRA's share of a step is larger than on SD1.5 at 512 px",
                  f"medians of {REPEATS} interleaved requests per figure (1 image, 10 steps, 64x64)",
                  "load_ms: the first request naming a LoRA minus a request with it cached"],
    }
