"""Shared pytest fixtures: the demo handlers loaded in-process (helpers in harness/inprocess.py),
a fake ResNet-50 file, one torch thread."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.inprocess import demo_weights, load_handler, unpack


@pytest.fixture(scope="session")
def cam_handler(tmp_path_factory):
    from handlers.cam.handler import CamHandler

    # float32, the precision the others are judged against (tests/unit/test_cam_precisions.py);
    # the cpu config's int8 runs in the precision and target-matrix tests.
    model_dir = unpack(tmp_path_factory.mktemp("cam"), "cam", demo_weights("cam"), handler_overrides={"quantize": None})
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
    from handlers.ddpm.handler import DdpmHandler

    model_dir = unpack(tmp_path_factory.mktemp("ddpm"), "ddpm", demo_weights("ddpm"))
    return load_handler(DdpmHandler, "ddpm", model_dir)


@pytest.fixture(scope="session")
def sd15_handler(tmp_path_factory):
    from handlers.sd15.handler import Sd15Handler

    model_dir = unpack(tmp_path_factory.mktemp("sd15"), "sd15", demo_weights("sd15-smoke"))
    return load_handler(Sd15Handler, "sd15", model_dir)


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for a test of a tiny demo model: on a shared 2-core box, two OpenMP
    threads mostly wait for each other (measured 4-10x slower than one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
