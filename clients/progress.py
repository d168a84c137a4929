"""Progress of a diffusion request in the terminal: a tqdm bar driven by the server's streamed
events (steps done out of total, the server's ETA), and the preview images saved on the way."""
from __future__ import annotations

import base64
import sys
from pathlib import Path

from tqdm import tqdm

from clients.api import TorchServeClient


def streamed(client: TorchServeClient, model: str, payload: dict, label: str, version: str | None = None,
             preview_dir: Path | None = None) -> dict:
    """Runs one streaming request with a step bar; returns its response (what predict() gives).
    With `preview_dir`, every preview image is saved as step-<k>-<image>.png there."""
    response = None
    bar = tqdm(desc=label, unit="step", file=sys.stderr, bar_format="{desc}: {n}/{total} steps |{bar}|{postfix}",
               total=payload.get("steps"))
    try:
        for event in client.stream(model, payload, version=version):
            kind = event["event"]
            if kind == "progress":
                bar.total = event["total"]
                bar.n = event["step"]
                eta = event["eta_s"]
                bar.set_postfix_str(f"{event['elapsed_s']:.1f} s elapsed"
                                    + ("" if eta is None else f", ETA {eta:.1f} s"), refresh=False)
                bar.refresh()
            elif kind == "preview" and preview_dir is not None:
                preview_dir.mkdir(parents=True, exist_ok=True)
                for i, image in enumerate(event["images"]):
                    (preview_dir / f"step-{event['step']:03d}-{i}.png").write_bytes(base64.b64decode(image))
            elif kind == "result":  # the last event: stream() ends after it, or raises
                response = event["response"]
    finally:
        bar.close()
    return response
