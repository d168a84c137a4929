"""Single-file SD1.5 checkpoints served by a real TorchServe: the fixture model
(harness/sd15_single_file.py) archived by archive.sh from its diffusers directory, from its fp32
file and from its fp16 file, the three in one server. Per seed the fp32 file draws the
directory's image exactly and the fp16 file within the bound below; a file archive's PNGs carry
the file's own sha256 as Model hash, and it has no safety checker."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from harness.sd15_single_file import write_fixture
from harness.torchserve import TorchServeInstance, model_configs_with, run_archive_sh

# An fp16 file holds the fp32 weights rounded to fp16; served here in fp32 throughout.
# Measured on this fixture at 3 steps, 64x64, over 16 seeds: at most 8 of 255 in a channel, 0.15 on
# average. The bounds leave room for other seeds and CPUs.
FP16_MAX_PIXEL_DIFF = 12
FP16_MEAN_PIXEL_DIFF = 0.5
BASE = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    fixture = write_fixture(root)
    weights = {"sd15_dir": fixture.directory, "sd15_file": fixture.fp32, "sd15_file_fp16": fixture.fp16}
    # The UNet in float32 as well, so that the bounds below measure the file's fp16 rounding alone
    # (cpu.yaml's bfloat16 UNet would round each trajectory again).
    configs = model_configs_with(root / "model_configs", {("sd15", "cpu"): {"unet_dtype_cpu": None}})
    for name, path in weights.items():
        run = run_archive_sh("--store", str(root / "store"), "--name", name, "--weights", str(path),
                             "--config-tree", str(fixture.config_tree), "sd15", model_configs=configs)
        assert run.returncode == 0, run.stderr
    with TorchServeInstance(archives=list(weights), source_store=root / "store") as ts:
        yield ts, weights


def png(server, model: str, seed: int) -> Image.Image:
    resp = server.client.predict_raw(model, {**BASE, "seed": seed}, accept="image/png")
    assert resp.status_code == 200, resp.text[:300]
    return Image.open(io.BytesIO(resp.content))


def test_a_file_draws_its_directorys_image_per_seed(served):
    server, _ = served
    images = {seed: {m: np.asarray(png(server, m, seed), dtype=int) for m in ("sd15_dir", "sd15_file", "sd15_file_fp16")}
              for seed in SEEDS}
    assert not np.array_equal(images[0]["sd15_dir"], images[1]["sd15_dir"]), "the seed changes nothing"
    for seed, by_model in images.items():
        assert np.array_equal(by_model["sd15_file"], by_model["sd15_dir"]), seed
        diff = np.abs(by_model["sd15_file_fp16"] - by_model["sd15_dir"])
        assert diff.max() <= FP16_MAX_PIXEL_DIFF and diff.mean() <= FP16_MEAN_PIXEL_DIFF, (seed, diff.max(), diff.mean())


@pytest.mark.parametrize("model", ["sd15_file", "sd15_file_fp16"])
def test_model_hash_is_the_files_sha256_and_there_is_no_safety_checker(served, model):
    server, weights = served
    digest = hashlib.sha256(weights[model].read_bytes()).hexdigest()
    assert f"Model hash: {digest[:10]}, Model: {model}" in png(server, model, 0).text["parameters"]
    (desc,) = server.client.describe(model, customized=True)
    meta = desc["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["safety_checker"] is False
