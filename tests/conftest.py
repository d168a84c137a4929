"""Shared pytest fixtures: repo paths, demo weights, unpacked model dirs, handlers in-process."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.context import ServingMockContext

REPO = Path(__file__).resolve().parents[1]


def demo_weights(model: str) -> Path:
    path = REPO / "weights" / "demo" / model
    if not path.is_dir():
        pytest.fail(f"{path} missing: run 'make weights' (make test does it first)")
    return path


def unpack(tmp: Path, model: str, weights: Path, target: str = "cpu") -> Path:
    """A model dir laid out like TorchServe's unpacked archive of archive.sh."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "weights").symlink_to(weights.resolve())
    shutil.copy(REPO / "model_configs" / model / f"{target}.yaml", tmp / f"{target}.yaml")
    return tmp


def load_handler(handler_cls, model: str, model_dir: Path, target: str = "cpu"):
    ctx = ServingMockContext(model_dir, model, yaml_file=f"{target}.yaml")
    handler = handler_cls()
    handler.initialize(ctx)
    return handler, ctx


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def cam_handler(tmp_path_factory):
    from handlers.cam import CamHandler

    model_dir = unpack(tmp_path_factory.mktemp("cam"), "cam", demo_weights("cam"))
    return load_handler(CamHandler, "cam", model_dir)


@pytest.fixture(scope="session")
def fake_resnet50_file(tmp_path_factory) -> Path:
    """A randomly initialised ResNet-50 saved under the official torchvision file name (the
    real ImageNet file cannot be downloaded here; the layout and loading code are the same)."""
    import torch
    import torchvision

    from weights import prepare_cam_pretrained

    d = tmp_path_factory.mktemp("hub") / "checkpoints"
    d.mkdir()
    path = d / prepare_cam_pretrained.FILENAME
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def ddpm_handler(tmp_path_factory):
    from handlers.ddpm import DdpmHandler

    model_dir = unpack(tmp_path_factory.mktemp("ddpm"), "ddpm", demo_weights("ddpm"))
    return load_handler(DdpmHandler, "ddpm", model_dir)


@pytest.fixture(scope="session")
def sd15_handler(tmp_path_factory):
    from handlers.sd15 import Sd15Handler

    model_dir = unpack(tmp_path_factory.mktemp("sd15"), "sd15", demo_weights("sd15"))
    return load_handler(Sd15Handler, "sd15", model_dir)


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for a test of a tiny demo model: on a shared 2-core box, two OpenMP
    threads mostly wait for each other (measured 4-10x slower than one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
