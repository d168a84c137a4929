"""The same seed and request give the same image on every target's sd15 config (float32 on this
CPU, the gpu config's included) and in plain diffusers, at a size above the trained demo VAE's own
`sample_size` (64 px): the knobs that differ between targets (attention slicing, VAE tiles,
threads) change no pixel there. VAE tiles (`vae_tile_size`) change nothing up to the tile size and
stay within the bound docs/targets.md states above it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from deploy.targets import targets
from handlers.sd15.handler import Sd15Handler
from handlers.sd15.model import set_vae_tiles
from harness.context import run_batch
from harness.inprocess import demo_weights, load_handler, pixels, unpack

REQUEST = {"prompt": "a handwritten 3", "steps": 4, "width": 128, "height": 128, "seed": 7}
TILED_MEAN_BOUND = 8.0  # /255, at 768 px, the demo VAE: docs/targets.md ("VAE tiles") states it


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Plain diffusers on the same weights and seed."""
    pipe = StableDiffusionPipeline.from_pretrained(demo_weights("sd15"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(REQUEST["prompt"], num_inference_steps=REQUEST["steps"], width=128, height=128,
                     generator=torch.Generator().manual_seed(REQUEST["seed"])).images[0]
    return np.asarray(image, dtype=int)


@pytest.mark.parametrize("target", targets("sd15"))
def test_every_target_draws_the_diffusers_image(target, reference, tmp_path, one_torch_thread):
    # the gpu config too: float32 on this CPU
    unpack(tmp_path, "sd15", demo_weights("sd15"), target, handler_overrides={"dtype_cpu": "float32", "unet_dtype_cpu": None})
    handler, ctx = load_handler(Sd15Handler, "sd15", tmp_path, target)
    torch.set_num_threads(1)
    (out,) = run_batch(handler, ctx, [{"body": REQUEST}])
    assert ctx.status(0) == 200
    served = pixels(json.loads(out)["images"][0])
    assert np.abs(served - reference).max() <= 1


@pytest.fixture(scope="module")
def demo_vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(demo_weights("sd15"), subfolder="vae").eval()


def decode(vae, side: int, tile: int | None) -> torch.Tensor:
    z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(side))
    set_vae_tiles(vae, tile)
    with torch.inference_mode():
        x = vae.decode(z / vae.config.scaling_factor).sample
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round()


@pytest.mark.parametrize("side", [128, 512])
def test_tiles_change_nothing_up_to_the_tile_size(demo_vae, side, one_torch_thread):
    assert torch.equal(decode(demo_vae, side, 512), decode(demo_vae, side, None))


def test_tiles_above_the_tile_size_stay_within_the_stated_bound(demo_vae, one_torch_thread):
    tiled, whole = decode(demo_vae, 768, 512), decode(demo_vae, 768, None)
    diff = (tiled - whole).abs()
    assert 0 < diff.mean() <= TILED_MEAN_BOUND  # tiles do change pixels above their size


@pytest.mark.parametrize("tile", [64, 500])
def test_a_tile_under_512_or_off_the_latent_grid_is_refused(demo_vae, tile):
    with pytest.raises(ValueError, match="vae_tile_size"):
        set_vae_tiles(demo_vae, tile)
