"""The `realsize` weights set: the three models in their real architectures and sizes, with random
weights (nothing can be downloaded here), for `make bench-real` (benchmarks/bench_real.py).

What each directory is, and how it reaches the handlers: the same files, in the same layout,
as the pretrained profile's, so they go through the pretrained path (`SD15_WEIGHTS`,
`DDPM_WEIGHTS`, `CAM_WEIGHTS` for archive.sh; cam through `weights.prepare_cam_pretrained`):

    sd15/  SD1.5's diffusers pipeline built from weights/sd15-config: UNet2DConditionModel
           (859.5 M parameters), CLIPTextModel ViT-L/14 (123 M) with the real CLIP tokenizer (the
           one bundled with the demo model), AutoencoderKL with sample_size 512 (83.7 M), PNDM
           scheduler; no safety checker (its CLIP vision tower is 304 M more; see docs/benchmarks.md)
    ddpm/  google/ddpm-cifar10-32's UNet2DModel (35.7 M parameters, 32 px) and DDPM scheduler
    cam/   torchvision resnet50(num_classes=1000) at 224 px, written by prepare_cam_pretrained from
           a random state-dict file, calibration crops of scikit-learn's sample photographs

Random weights draw noise, at the real cost: the speed, memory and load time of every module are
those of the real models. Each UNet's output layer is scaled down so that a random noise
prediction stays small over many steps, as a trained one does (an unscaled random UNet drives
the latents far outside the range a VAE decodes: NaN/inf in the images, not a measurement).

    python -m weights.build_realsize [--out weights/realsize] [sd15 ddpm cam]   (~1 min, 4.3 GB)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from weights.atomic import atomic_dir

ROOT = Path(__file__).resolve().parent
CONFIG_TREE = ROOT / "sd15-config"
TOKENIZER = ROOT / "demo" / "sd15" / "tokenizer"  # the real CLIP ViT-L/14 vocabulary and merges
MODELS = ("sd15", "ddpm", "cam")
OUTPUT_SCALE = 0.01  # the random UNets' conv_out weights are multiplied by this (docstring)

# google/ddpm-cifar10-32 (unet/config.json and scheduler/scheduler_config.json of that repository)
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
)
DDPM_CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              beta_schedule="linear", variance_type="fixed_large", clip_sample=True)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def quiet_output(unet: torch.nn.Module) -> None:
    unet.conv_out.weight.mul_(OUTPUT_SCALE)
    unet.conv_out.bias.zero_()


def build_sd15(out: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_TREE / "unet"))
    quiet_output(unet)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_TREE / "text_encoder"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_TREE / "vae"))
    pipe = StableDiffusionPipeline(
        unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        scheduler=PNDMScheduler.from_pretrained(CONFIG_TREE / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(out) as stage:
        pipe.save_pretrained(stage)
    return {"unet": parameters(unet), "text_encoder": parameters(text_encoder), "vae": parameters(vae),
            "vae_sample_size": vae.config.sample_size}


def build_ddpm(out: Path) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**DDPM_CIFAR10_UNET)
    quiet_output(unet)
    with atomic_dir(out) as stage:
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**DDPM_CIFAR10_SCHEDULER)).save_pretrained(stage)
    return {"unet": parameters(unet)}


def build_cam(out: Path) -> dict:
    import torchvision

    from weights import prepare_cam_pretrained

    net = torchvision.models.resnet50(num_classes=1000)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "resnet50-random.pth"
        torch.save(net.state_dict(), state)
        if prepare_cam_pretrained.main(["--out", str(out), "--weights-file", str(state)]) != 0:
            raise SystemExit("weights.prepare_cam_pretrained refused the random ResNet-50 (above)")
    return {"net": parameters(net)}


BUILDERS = {"sd15": build_sd15, "ddpm": build_ddpm, "cam": build_cam}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "realsize", help="root of the set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"any of {' '.join(MODELS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := set(args.models) - set(MODELS):
        parser.error(f"unknown model(s) {' '.join(sorted(unknown))}: choose from {' '.join(MODELS)}")
    for model in args.models:
        out = args.out / model
        record = out / "realsize.json"
        if record.is_file():
            print(f"weights: {out} present")
            continue
        print(f"weights: building the real-size {model} with random weights -> {out}", flush=True)
        torch.manual_seed(args.seed)
        shutil.rmtree(out, ignore_errors=True)
        counts = BUILDERS[model](out)
        record.write_text(json.dumps({"model": model, "seed": args.seed, "random_weights": True,
                                      "parameters": counts, "torch": torch.__version__}, indent=2) + "\n")
        print(f"weights: {out}: parameters {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
