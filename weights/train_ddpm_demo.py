"""Train the `ddpm` demo weights: a small diffusers UNet2DModel + DDPMScheduler on the sklearn digits.

The result is a diffusers-layout directory (model_index.json, unet/, scheduler/) that
`DDPMPipeline.from_pretrained` loads, plus `training.json` recording how it was made. It is small
enough to commit, so `make test` never has to train it.

    .venv/bin/python -m weights.train_ddpm_demo --out weights/demo/ddpm
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from weights import digits
from weights.atomic import atomic_dir

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="weights/demo/ddpm", help="output directory (replaced atomically)")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="squaredcos_cap_v2")
    p.add_argument("--num-train-timesteps", type=int, default=1000)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3000)")
    length.add_argument("--epochs", type=int, default=None, help="passes over the training digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=16, help="the 8x8 digits are upscaled to this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--block-out-channels", default="32,64,64",
                   help="comma-separated channels per UNet resolution level")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention in the lowest-resolution down/up blocks")
    p.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the EMA")
    # 1, not 2: on a busy 2-core box two OpenMP threads wait on each other and ran 3-8x slower
    # (measured); one thread is ~1.6x slower than two only when the machine is idle.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for determinism)")
    p.add_argument("--all-digits", action="store_true",
                   help="train on all 1797 digits instead of the training split of digits.split_indices()")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    args = p.parse_args(argv)
    args.block_out_channels = tuple(int(c) for c in args.block_out_channels.split(","))
    if args.image_size % 2 ** (len(args.block_out_channels) - 1):
        p.error("--image-size must be divisible by 2**(levels-1)")
    return args


def build_unet(args):
    from diffusers import UNet2DModel

    levels = len(args.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if args.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=args.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        # the default of 32 groups would leave a single channel per group at 32 channels
        norm_num_groups=8,
        attention_head_dim=min(32, args.block_out_channels[-1]),
    )


def load_training_images(args) -> torch.Tensor:
    """(N, 1, size, size) digits scaled to [-1, 1]."""
    images, _ = digits.load_arrays()
    if not args.all_digits:
        train_idx, _ = digits.split_indices(seed=0)
        images = images[train_idx]
    return digits.upscale(images, args.image_size) * 2.0 - 1.0


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    data = load_training_images(args)
    n = len(data)
    steps_per_epoch = math.ceil(n / args.batch_size)
    if args.epochs is not None:
        total_steps = args.epochs * steps_per_epoch
    else:
        total_steps = args.steps if args.steps is not None else 3000

    unet = build_unet(args)
    num_params = sum(p.numel() for p in unet.parameters())
    scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps,
                              beta_schedule=args.beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(args.warmup_steps, total_steps), total_steps))
    ema = None
    if args.ema_decay > 0:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True,
                       inv_gamma=1.0, power=3 / 4)

    # one generator drives shuffling, noise and timesteps, so a seed fixes the whole run
    gen = torch.Generator().manual_seed(args.seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    recent: list[float] = []
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    unet.train()
    bar = tqdm(range(total_steps), desc="ddpm", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        if pos + args.batch_size > n:  # drop the ragged tail: every batch has the same size
            perm, pos = torch.randperm(n, generator=gen), 0
        clean = data[perm[pos:pos + args.batch_size]]
        pos += args.batch_size
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, args.num_train_timesteps, (len(clean),), generator=gen)
        noisy = scheduler.add_noise(clean, noise, t)
        loss = F.mse_loss(unet(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        recent.append(loss.item())
        del recent[:-200]
        if step % 20 == 0 or step == total_steps - 1:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_sched.get_last_lr()[0]:.1e}")
    bar.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()

    out = Path(args.out)
    with atomic_dir(out) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                    if k not in ("out", "no_progress")}
        info = {
            "model": "ddpm demo: diffusers UNet2DModel + DDPMScheduler on sklearn digits",
            "settings": settings,
            "seed": args.seed,
            "total_steps": total_steps,
            "epochs": round(total_steps * args.batch_size / n, 2),
            "train_images": n,
            "pixel_range": [-1, 1],
            "num_params": num_params,
            "weights": "EMA" if ema is not None else "raw",
            "final_loss": round(sum(recent) / len(recent), 5),
            "final_loss_note": "mean epsilon-MSE over the last 200 steps (raw weights)",
            "wall_time_s": round(wall, 1),
            # the CPU may be shared: process CPU time and the load average put wall time in context
            "cpu_time_s": round(cpu, 1),
            "machine": {"cpu_count": os.cpu_count(), "threads": args.threads,
                        "load_avg_1min_start_end": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                        "platform": platform.platform()},
            "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
        }
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out} ({num_params / 1e6:.2f}M params, {total_steps} steps, "
          f"{wall:.0f}s, final loss {info['final_loss']})")
    return info


if __name__ == "__main__":
    main()
