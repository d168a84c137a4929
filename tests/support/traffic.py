"""Request mixes for load and fault tests: one small, valid request per model, and helpers to
read worker processes (pids, RSS) of a running TorchServe."""
from __future__ import annotations

import psutil

from tests.conftest import png_bytes
from weights import digits


def valid_payloads() -> dict:
    """A cheap valid request per model (small sizes and few steps for the diffusion models)."""
    images, _ = digits.load_arrays()
    return {
        "cam": png_bytes(digits.to_pil(images[0], 64)),
        "ddpm": {"num_images": 1, "steps": 5, "seed": 0},
        "sd15": {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "seed": 0},
    }


def worker_pids(client, model: str) -> list[int]:
    return sorted(w["pid"] for d in client.describe(model) for w in d["workers"])


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20
