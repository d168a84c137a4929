"""Measure whether the `ddpm` demo weights draw recognisable digits, judged by the `cam` demo classifier.

Draws samples with DDIM (50 steps, eta 0, scheduler built from the saved DDPM scheduler config),
classifies them with the cam ResNet, and writes a Markdown report plus a PNG grid of samples:

    .venv/bin/python -m benchmarks.eval_ddpm_quality --ddpm weights/demo/ddpm --cam weights/demo/cam

Goals: at least 70 % of samples classified with top probability >= 0.9, and every digit class
predicted for at least 4 % of the samples (the model draws all ten digits, not a few easy ones).
Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from weights import digits

CONFIDENCE = 0.9
GOAL_CONFIDENT = 0.70
GOAL_CLASS_SHARE = 0.04


def judged_samples_parser(description: str, num_help: str) -> argparse.ArgumentParser:
    """The arguments of every ddpm evaluation: the model, the judge, how many samples."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ddpm", default="weights/demo/ddpm", help="diffusers DDPM pipeline directory")
    p.add_argument("--cam", default="weights/demo/cam", help="cam demo weights directory")
    p.add_argument("--num", type=int, default=200, help=num_help)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = judged_samples_parser(__doc__.splitlines()[0], "samples to draw")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ddpm-quality",
                   help="report path without extension (.md and .png are written)")
    return p.parse_args(argv)


def sample(ddpm_dir: str, num: int, steps: int, seed: int, eta: float = 0.0,
           batch_size: int = 100) -> torch.Tensor:
    """(num, 1, H, W) samples in [0, 1] drawn with DDIM from the saved pipeline."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(ddpm_dir, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(ddpm_dir, subfolder="scheduler"))
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        with torch.inference_mode():
            images = pipe(batch_size=n, generator=gen, eta=eta, num_inference_steps=steps,
                          output_type="np").images  # (n, H, W, C) in [0, 1]
        out.append(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    return torch.cat(out).float().clamp(0, 1)


class CamClassifier:
    """The cam classifier of a weights directory with the preprocessing its cam_config.json
    describes (handlers.cam.classifier, as served)."""

    def __init__(self, cam_dir: str):
        from handlers.cam import classifier as cam_model

        config = cam_model.read_config(cam_dir)
        self.model = cam_model.load_model(cam_dir, config)
        self.transform = cam_model.preprocess(config)

    def probabilities(self, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
        """(N, 1, H, W) white-on-black images in [0, 1] -> (N, 10) softmax probabilities."""
        from PIL import Image

        pils = [Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), mode="L") for img in images]
        probs = []
        with torch.inference_mode():
            for start in range(0, len(pils), batch_size):
                x = torch.stack([self.transform(p) for p in pils[start:start + batch_size]])
                probs.append(self.model(x).softmax(dim=1))
        return torch.cat(probs)


def summarize(probs: torch.Tensor) -> dict:
    top, pred = probs.max(dim=1)
    shares = torch.bincount(pred, minlength=digits.NUM_CLASSES).float() / len(pred)
    confident = (top >= CONFIDENCE).float().mean().item()
    return {
        "confident_fraction": confident,
        "mean_top_probability": top.mean().item(),
        "class_shares": shares.tolist(),
        "min_class_share": shares.min().item(),
        "pass_confident": confident >= GOAL_CONFIDENT,
        "pass_classes": bool((shares >= GOAL_CLASS_SHARE).all()),
        "predictions": pred.tolist(),
    }


def save_grid(images: torch.Tensor, path: Path, cell: int = 64) -> None:
    """The first 64 samples as an 8x8 grid, each upscaled (nearest) to `cell` px so a person can see it."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    big = F.interpolate(images[:64], size=(cell, cell), mode="nearest")
    save_image(make_grid(big, nrow=8, padding=4, pad_value=0.5), str(path))


def training_command(training: dict, out: str) -> str:
    """The train_ddpm_demo command line that reproduces these weights (non-default settings only)."""
    from weights import train_ddpm_demo

    defaults = vars(train_ddpm_demo.parse_args([]))
    parts = ["python -m weights.train_ddpm_demo"]
    if out != defaults["out"]:
        parts.append(f"--out {out}")
    for key, value in training.get("settings", {}).items():
        default = defaults.get(key)
        if isinstance(default, tuple):
            default = list(default)
        if value == default or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def write_report(path: Path, args, result: dict, real: dict | None, training: dict | None,
                 image_size: int, sample_time: float) -> None:
    ok = result["pass_confident"] and result["pass_classes"]
    mark = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    lines = [
        "# ddpm demo: sample quality",
        "",
        f"**Overall: {mark(ok)}.** {args.num} samples from `{args.ddpm}` drawn with DDIM "
        f"({args.steps} steps, eta {args.eta}, seed {args.seed}), classified by the cam demo model "
        f"`{args.cam}`. Generated by `python -m benchmarks.eval_ddpm_quality`.",
        "",
        "| measure | value | goal | result |",
        "|---|---|---|---|",
        f"| samples with top probability >= {CONFIDENCE} | {result['confident_fraction']:.1%} | "
        f">= {GOAL_CONFIDENT:.0%} | {mark(result['pass_confident'])} |",
        f"| smallest share of one predicted digit | {result['min_class_share']:.1%} | "
        f">= {GOAL_CLASS_SHARE:.0%} each | {mark(result['pass_classes'])} |",
        f"| mean top probability | {result['mean_top_probability']:.3f} | | |",
        "",
        "Share of samples per predicted digit:",
        "",
        "| digit | " + " | ".join(digits.LABELS) + " |",
        "|---" * (digits.NUM_CLASSES + 1) + "|",
        "| share | " + " | ".join(f"{s:.1%}" for s in result["class_shares"]) + " |",
        "",
    ]
    if real is not None:
        lines += [
            f"Reference: the same classifier on the {real['n']} held-out real digits, upscaled to the "
            f"same {image_size}x{image_size} size: {real['confident_fraction']:.1%} with top probability "
            f">= {CONFIDENCE}, mean top probability {real['mean_top_probability']:.3f}.",
            "",
        ]
    preds = result["predictions"][:64]
    lines += [
        f"`{path.with_suffix('.png').name}`: the first 64 samples (row by row). The classifier's "
        "predicted digit for each:",
        "",
        "```",
        *(" ".join(str(d) for d in preds[r * 8:(r + 1) * 8]) for r in range(8)),
        "```",
        "",
        "## Settings",
        "",
        f"- image size {image_size}x{image_size}; sampling took {sample_time:.1f} s "
        f"on {args.threads} CPU threads",
    ]
    if training is not None:
        s = training.get("settings", {})
        load = training.get("machine", {}).get("load_avg_1min_start_end")
        lines += [
            f"- reproduce the weights: `{training_command(training, args.ddpm)}` "
            f"(wall time {training.get('wall_time_s')} s, process CPU time "
            f"{training.get('cpu_time_s', '?')} s on {s.get('threads')} thread(s)"
            + (f", 1-min load average {load[0]} at start / {load[1]} at end: the CPU was shared)" if load else ")"),
            f"- training: {training.get('total_steps')} steps, batch {s.get('batch_size')}, "
            f"beta schedule `{s.get('beta_schedule')}`, UNet block_out_channels "
            f"{s.get('block_out_channels')}, layers_per_block {s.get('layers_per_block')}, "
            f"{training.get('num_params', 0) / 1e6:.2f}M params, {training.get('weights')} weights, "
            f"seed {training.get('seed')}, final loss {training.get('final_loss')}, wall time "
            f"{training.get('wall_time_s')} s",
        ]
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    images = sample(args.ddpm, args.num, args.steps, args.seed, args.eta, args.batch_size)
    sample_time = time.perf_counter() - t0
    image_size = images.shape[-1]

    classifier = CamClassifier(args.cam)
    result = summarize(classifier.probabilities(images))

    arrays, _ = digits.load_arrays()
    _, held_out = digits.split_indices(seed=0)
    real = summarize(classifier.probabilities(digits.upscale(arrays[held_out], image_size)))
    real["n"] = len(held_out)

    training_file = Path(args.ddpm, "training.json")
    training = json.loads(training_file.read_text()) if training_file.is_file() else None
    save_grid(images, out.with_suffix(".png"))
    write_report(out.with_suffix(".md"), args, result, real, training, image_size, sample_time)

    shares = " ".join(f"{d}:{s:.0%}" for d, s in zip(digits.LABELS, result["class_shares"]))
    print(f"confident (p>={CONFIDENCE}): {result['confident_fraction']:.1%} "
          f"[{'PASS' if result['pass_confident'] else 'FAIL'}]; class shares {shares} "
          f"[{'PASS' if result['pass_classes'] else 'FAIL'}]; real held-out digits "
          f"{real['confident_fraction']:.1%}; report {out.with_suffix('.md')}")
    result["real_confident_fraction"] = real["confident_fraction"]
    return result


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r["pass_confident"] and r["pass_classes"] else 1)
