"""Peak memory of SD1.5 in fp32 as the arm64 config runs it (docs/targets.md, "sd15"), measured
with the real shapes and random weights, so no download is needed (memory does not depend on the
architecture or on the weights' values):

    python -m benchmarks.sd15_memory --batch 2 --size 512     # UNet batch 2 = one guided image

Prints the peak RSS once the UNet and VAE are built, after one UNet step (attention slicing),
after a tiled VAE decode. One process per measurement: a peak never goes down.
"""
from __future__ import annotations

import argparse
import resource

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from handlers.sd15.model import set_vae_tiles


def sd15_vae() -> AutoencoderKL:
    """SD1.5's VAE config (as in the stable-diffusion-v1-5 repository), random weights."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                         scaling_factor=0.18215).eval()


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2, help="UNet batch: 2 per image with guidance")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    unet = UNet2DConditionModel(  # SD1.5's UNet config
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    vae = sd15_vae()
    loaded = peak_gib()
    print(f"UNet + VAE built: peak {loaded:.2f} GiB", flush=True)
    unet.set_attention_slice("auto")
    set_vae_tiles(vae, 512)  # as arm64.yaml's vae_tile_size
    latent = args.size // 8
    with torch.no_grad():
        unet(torch.randn(args.batch, 4, latent, latent), 10, encoder_hidden_states=torch.randn(args.batch, 77, 768))
        stepped = peak_gib()
        print(f"UNet step, batch {args.batch} at {args.size} px: peak {stepped:.2f} GiB (+{stepped - loaded:.2f})")
        vae.decode(torch.randn(max(1, args.batch // 2), 4, latent, latent))
        print(f"tiled VAE decode: peak {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
