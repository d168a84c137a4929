"""Handlers run in-process, the way TorchServe's worker runs them: demo weights, a model dir laid
out like an unpacked archive, a loaded handler with its ServingMockContext, PNG bytes of an image
and the pixels of an answer's PNG."""
from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from harness import REPO
from harness.context import ServingMockContext


def demo_weights(model: str) -> Path:
    """weights/demo/<model>; FileNotFoundError (saying how to build it) when it is missing."""
    path = REPO / "weights" / "demo" / model
    if not path.is_dir():
        raise FileNotFoundError(f"{path} missing: run 'make weights'")
    return path


def unpack(tmp: Path, model: str, weights: Path, target: str = "cpu",
           handler_overrides: dict | None = None) -> Path:
    """A model dir laid out like TorchServe's unpacked archive of archive.sh; `handler_overrides`
    replace keys of the target yaml's `handler` section (e.g. {"dtype_cpu": "float16"})."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "weights").symlink_to(weights.resolve())
    config = REPO / "model_configs" / model / f"{target}.yaml"
    if handler_overrides:
        cfg = yaml.safe_load(config.read_text())
        cfg.setdefault("handler", {}).update(handler_overrides)
        (tmp / f"{target}.yaml").write_text(yaml.safe_dump(cfg))
    else:
        shutil.copy(config, tmp / f"{target}.yaml")
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


def held_out_digit(path: Path) -> int:
    """The first held-out demo digit written to `path` as a 64 px PNG; returns its label."""
    from weights import digits

    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    i = int(test[0])
    Path(path).write_bytes(png_bytes(digits.to_pil(images[i], 64)))
    return int(labels[i])


def pixels(b64_png: str) -> np.ndarray:
    """An answer's base64 PNG as an int array (differences do not wrap)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))), dtype=int)


def gradient_png(size: int = 64) -> bytes:
    """A smooth RGB test picture (img2img / inpainting input)."""
    x = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 128, np.uint8)], -1)
    return png_bytes(Image.fromarray(rgb))
