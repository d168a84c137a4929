"""The `ddpm` demo training script: a tiny run end to end, saved atomically in diffusers layout."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from weights import train_ddpm_demo

# 8x8 images, two UNet levels, a few steps: seconds, not minutes
TINY = ["--steps", "3", "--image-size", "8", "--batch-size", "4", "--block-out-channels", "8,16",
        "--warmup-steps", "1", "--threads", "1", "--no-progress"]


def train(out, *extra):
    return train_ddpm_demo.main([*TINY, "--out", str(out), *extra])


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_trains_and_loads_as_ddpm_pipeline(tmp_path, schedule):
    from diffusers import DDPMPipeline

    out = tmp_path / "ddpm"
    info = train(out, "--beta-schedule", schedule)

    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler", "training.json"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == schedule
    assert config["num_train_timesteps"] == 1000

    recorded = json.loads((out / "training.json").read_text())
    assert recorded["settings"]["beta_schedule"] == schedule
    assert recorded["seed"] == 0 and recorded["total_steps"] == 3
    assert recorded["final_loss"] == info["final_loss"] and recorded["wall_time_s"] >= 0

    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.beta_schedule == schedule
    unet = pipe.unet
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (1, 1, 8)
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 8, 8, 1)
    # nothing but the result is left next to it
    assert [p.name for p in tmp_path.iterdir()] == ["ddpm"]


def test_same_seed_same_weights_and_rerun_replaces(tmp_path):
    from safetensors.torch import load_file

    weights = lambda: load_file(str(tmp_path / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    train(tmp_path / "ddpm")
    first = weights()
    train(tmp_path / "ddpm")  # overwrites the existing result in place
    second = weights()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [p.name for p in tmp_path.iterdir()] == ["ddpm"]


def test_failed_save_leaves_no_partial_dir(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path / "ddpm")
    assert list(tmp_path.iterdir()) == []
