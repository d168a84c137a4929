"""Handlers run in-process, the way TorchServe's worker runs them: demo weights, a model dir laid
out like an unpacked archive, a loaded handler with its ServingMockContext, PNG bytes of an image."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

from harness import REPO
from harness.context import ServingMockContext


def demo_weights(model: str) -> Path:
    """weights/demo/<model>; FileNotFoundError (saying how to build it) when it is missing."""
    path = REPO / "weights" / "demo" / model
    if not path.is_dir():
        raise FileNotFoundError(f"{path} missing: run 'make weights'")
    return path


def unpack(tmp: Path, model: str, weights: Path, target: str = "cpu") -> Path:
    """A model dir laid out like TorchServe's unpacked archive of archive.sh."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "weights").symlink_to(weights.resolve())
    shutil.copy(REPO / "model_configs" / model / f"{target}.yaml", tmp / f"{target}.yaml")
    return tmp


def load_handler(handler_cls, model: str, model_dir: Path, target: str = "cpu"):
    """(initialised handler, its ServingMockContext) for an unpacked model dir."""
    ctx = ServingMockContext(model_dir, model, yaml_file=f"{target}.yaml")
    handler = handler_cls()
    handler.initialize(ctx)
    return handler, ctx


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
