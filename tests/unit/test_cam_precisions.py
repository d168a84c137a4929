"""cam in each precision it can run in, against float32 on every held-out digit: int8
(`quantize: int8`), bfloat16 and float16 (`dtype_cpu`; float16 is cam's gpu dtype, run here on the
CPU). The contract (handlers/cam/contract.py, docs/targets.md "cam precisions"):
the same top-1, probabilities within a stated bound, every coarse CAM map correlated >= 0.98 with
float32's and within 0.05 of it (maps are normalised to [0, 1]); within a precision, a batch
answers as each image alone within that precision's batch bound. The int8 model must really be
int8: quantized modules, the configured engine active."""
from __future__ import annotations

import pytest
import torch

from handlers.cam import quantize
from handlers.cam.handler import CamHandler
from harness.inprocess import demo_weights, load_handler, unpack
from tests.support.cam_contract import MAP_CORRELATION_MIN, MAP_MAX_ABS, PRECISIONS, map_correlation
from weights import digits


@pytest.fixture(scope="module")
def held_out(cam_handler) -> torch.Tensor:
    """Every held-out digit, preprocessed as a request is (64 px PNG digits as clients send them)."""
    handler, _ = cam_handler
    images, _ = digits.load_arrays()
    _, test = digits.split_indices()
    return handler.model.preprocess([digits.to_pil(images[i], 64) for i in test])[1]


@pytest.fixture(scope="module")
def float32(cam_handler, held_out):
    handler, _ = cam_handler
    assert handler.model.precision == "float32"
    return handler.model.fast_cam(held_out, [None] * len(held_out))


def load(precision: str, tmp_path_factory):
    model_dir = unpack(tmp_path_factory.mktemp(f"cam-{precision}"), "cam", demo_weights("cam"),
                       handler_overrides=PRECISIONS[precision]["config"])
    return load_handler(CamHandler, "cam", model_dir)[0].model


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_precision_keeps_the_contract_against_float32(precision, held_out, float32, tmp_path_factory, one_torch_thread):
    model = load(precision, tmp_path_factory)
    probs, chosen, maps = model.fast_cam(held_out, [None] * len(held_out))
    probs32, chosen32, maps32 = float32
    gaps = {"top1_differs": int((chosen != chosen32).sum()),
            "probability": float((probs - probs32).abs().max()),
            "correlation_min": float(map_correlation(maps.float().numpy(), maps32.numpy()).min()),
            "map": float((maps.float() - maps32).abs().max())}
    print(precision, gaps)
    assert gaps["top1_differs"] == 0, gaps
    assert gaps["probability"] <= PRECISIONS[precision]["probability"], gaps
    assert gaps["correlation_min"] >= MAP_CORRELATION_MIN, gaps
    assert gaps["map"] <= MAP_MAX_ABS, gaps
    alone = torch.cat([model.fast_cam(held_out[i : i + 1], [None])[2] for i in range(8)])
    batch = gap = float((alone - maps[:8]).abs().max())
    print(precision, "batch vs alone", batch)
    assert gap <= PRECISIONS[precision]["batch"], gap


def test_int8_is_really_int8(tmp_path_factory):
    """A build that silently stayed float must fail: quantized modules, the engine active."""
    model = load("int8", tmp_path_factory)
    assert quantize.is_quantized(model.trunk)
    assert torch.backends.quantized.engine == PRECISIONS["int8"]["config"]["quantized_engine"]
    assert model.precision == f"int8 ({torch.backends.quantized.engine})"
    assert model.describe()["precision"] == model.precision
