"""Progress of a diffusion request in the terminal: a tqdm bar driven by the server's streamed
events (steps done out of total, the server's ETA), the preview images saved on the way, and a
cancel sent to the server when the user presses Ctrl-C (docs/jobs.md)."""
from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

from clients.api import ServerError, TorchServeClient


def streamed(client: TorchServeClient, model: str, payload: dict, label: str, version: str | None = None,
             preview_dir: Path | None = None) -> dict:
    """Runs one streaming request with a step bar; returns its response (what predict() gives).
    With `preview_dir`, every preview image is saved as step-<k>-<image>.png there. On Ctrl-C the
    request is cancelled on the server by its id (one of the client's own unless the payload has
    one) before KeyboardInterrupt goes on: closing the connection alone does not stop it."""
    payload = {**payload, "request_id": payload.get("request_id") or secrets.token_urlsafe(16)}
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
    except KeyboardInterrupt:
        bar.close()
        cancel(client, model, payload["request_id"])
        raise
    finally:
        bar.close()
    return response


def cancel(client: TorchServeClient, model: str, request_id: str) -> None:
    """Cancels the request on the server (the `jobs` archive) and says what became of it on stderr."""
    try:
        answer = client.cancel(model, request_id)
    except (ServerError, OSError) as exc:
        print(f"interrupted; could not cancel request {request_id} on the server: {exc}", file=sys.stderr)
        return
    print(f"interrupted; request {request_id}: {answer['state']} ({answer['message']})", file=sys.stderr)
