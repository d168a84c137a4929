"""Build the demo-profile weights of the `cam` classifier: a ResNet-18 trained on the sklearn digits.

Offline and deterministic: a torchvision ResNet-18 (random init, unmodified architecture) is
trained on the train part of ``weights.digits.split_indices(seed=0)``, upscaled to
``--input-size`` pixels, and evaluated on the held-out part. The result is written atomically as

    <out>/model.safetensors   state_dict of torchvision.models.get_model(arch, num_classes=N)
    <out>/cam_config.json     arch, labels, preprocessing, target layer, metrics ...
    <out>/calibration/*.png   the int8 calibration set: the first 64 training digits

which is the layout the `cam` handler reads (``prepare_cam_pretrained.py`` writes the same one).

    python -m weights.build_cam_demo [--out weights/demo/cam] [--epochs N] [--seed 0] [--input-size 128]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

if not __package__:  # run as a file path (python weights/build_cam_demo.py): make `weights` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from handlers.cam import classifier as cam_model
from handlers.cam.quantize import CALIBRATION_DIR
from weights import digits
from weights.atomic import atomic_dir

ARCH = "resnet18"
TARGET_LAYER = "layer4"
DEFAULT_OUT = "weights/demo/cam"
DEFAULT_EPOCHS = 5
DEFAULT_INPUT_SIZE = 128
BATCH_SIZE = 32
CALIBRATION_COUNT = 64  # int8 calibration images a weights directory carries (handlers/cam/quantize.py)


# --------------------------------------------------------------------------- shared output helpers


def write_cam_dir(out: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                  calibration: list[Image.Image]) -> Path:
    """Write model.safetensors, cam_config.json and the int8 calibration set to `out`, replacing
    it atomically (weights.atomic)."""
    with atomic_dir(out) as tmp:
        # safetensors refuses non-contiguous (e.g. channels_last) tensors.
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / cam_model.WEIGHTS_NAME), metadata={"format": "pt", "arch": config["arch"]})
        (tmp / cam_model.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_calibration(tmp, calibration)
    return Path(out)


def write_calibration(wdir: str | os.PathLike, images: list[Image.Image]) -> None:
    """`images` as wdir/calibration/NNNN.png: what `quantize: int8` calibrates on at load."""
    folder = Path(wdir) / CALIBRATION_DIR
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        img.save(folder / f"{i:04d}.png")


def digit_calibration(count: int = CALIBRATION_COUNT) -> list[Image.Image]:
    """The first `count` training digits at 64 px, as clients send them; never the held-out digits
    that judge the int8 contract."""
    images, _ = digits.load_arrays()
    train, _ = digits.split_indices()
    return [digits.to_pil(images[i], 64) for i in train[:count]]


def feature_map_size(model: torch.nn.Module, input_size: int, layer: str = TARGET_LAYER) -> list[int]:
    """Spatial size (h, w) of `layer`'s output for an input_size x input_size input."""
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape  # returns None: a hook's return value would replace the output

    hook = getattr(model, layer).register_forward_hook(record)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        hook.remove()
        model.train(was_training)
    return list(seen["shape"][-2:])


# --------------------------------------------------------------------------- training


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Reductions are split across threads, so the thread count is part of the result.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the uint8 grid, as the handler's PIL input always is."""
    return (x * 255).round_().div_(255)


def random_affine(x: torch.Tensor, gen: torch.Generator, max_deg: float = 12.0,
                  max_shift: float = 0.08, scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-sample small rotation / shift / scale of a (B, 1, H, W) batch, black fill, seeded."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_deg)
    s = scale[0] + torch.rand(b, generator=gen) * (scale[1] - scale[0])
    # affine_grid works in [-1, 1] coordinates: a shift of f * width is 2 * f there.
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * max_shift)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_model_input(x: torch.Tensor, config: dict) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> the model input (B, 3, H, W), channels_last (faster convs on CPU):
    quantized, then normalised by the served preprocessing's tensor_transform (handlers.cam.classifier)."""
    x = cam_model.tensor_transform(config)(quantize(x).expand(-1, 3, -1, -1))
    return x.as_subclass(torch.Tensor).contiguous(memory_format=torch.channels_last)


def train(args) -> tuple[torch.nn.Module, dict, dict]:
    t_start = time.perf_counter()
    set_determinism(args.seed, args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = digits.load_arrays()
    train_idx, test_idx = digits.split_indices(seed=0)
    if args.train_limit:
        train_idx = train_idx[: args.train_limit]
    x_train = digits.upscale(images[train_idx], args.input_size)  # (N, 1, S, S) in [0, 1]
    y_train = torch.as_tensor(labels[train_idx])

    # The dataset's mean/std (of what the model sees: quantized, not augmented), rounded so the
    # config is readable; replicated over the 3 channels because the handler feeds RGB.
    q = quantize(x_train.clone())
    mean, std = round(q.mean().item(), 4), round(q.std().item(), 4)
    del q

    config = {
        "arch": ARCH,
        "num_classes": digits.NUM_CLASSES,
        "labels": list(digits.LABELS),
        "resize": args.input_size,
        "input_size": args.input_size,
        "mean": [mean] * 3,
        "std": [std] * 3,
        "grayscale": True,
        # What transparent pixels are flattened onto (handlers.core.images.decode_image): the digits
        # are white ink on black, so a transparent background must read as black.
        "background": [0, 0, 0],
        "target_layer": TARGET_LAYER,
        "profile": "demo",
        "source": (
            f"Demo weights built by weights/build_cam_demo.py: torchvision {ARCH} (random init) trained "
            f"{args.epochs} epoch(s) from scratch on the scikit-learn 8x8 digits (train part of "
            f"weights.digits.split_indices(seed=0)), upscaled bilinearly to {args.input_size}px, white "
            f"ink on black; seed {args.seed}. Recognises digits only."
        ),
    }

    model = cam_model.build_model(config)
    model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(train_idx) / BATCH_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25)

    last = {}
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            xb = x_train[idx]
            if not args.no_augment:
                xb = random_affine(xb, gen)
            xb, yb = to_model_input(xb, config), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        last = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
    train_seconds = time.perf_counter() - t_start

    model.eval()
    model = model.to(memory_format=torch.contiguous_format)
    acc, n, loss = evaluate(model, config, images[test_idx], labels[test_idx])
    metrics = {
        "heldout_accuracy": round(acc, 4),
        "heldout_loss": round(loss, 4),
        "heldout_count": n,
        "train_accuracy_last_epoch": round(last.get("train_accuracy", float("nan")), 4),
        "train_loss_last_epoch": round(last.get("train_loss", float("nan")), 4),
        "train_count": int(len(train_idx)),
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": BATCH_SIZE,
        "threads": args.threads,
        "augment": not args.no_augment,
        "cam_map_size": feature_map_size(model, args.input_size),
        "split": "weights.digits.split_indices(seed=0)",
        "eval": "held-out digits via digits.to_pil(img, input_size) + the handler preprocessing",
    }
    config["metrics"] = metrics
    return model, config, metrics


@torch.inference_mode()
def evaluate(model, config, images, labels) -> tuple[float, int, float]:
    """Held-out accuracy through the exact PIL path the handler takes."""
    preprocess = cam_model.preprocess(config)
    x = torch.stack([preprocess(digits.to_pil(img, config["input_size"])) for img in images])
    y = torch.as_tensor(labels)
    logits = torch.cat([model(x[i:i + 128]) for i in range(0, len(x), 128)])
    return ((logits.argmax(1) == y).float().mean().item(), len(y), F.cross_entropy(logits, y).item())


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (replaced atomically)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE,
                   help="training / serving size in px; >= 112 gives a 4x4 layer4 map")
    p.add_argument("--lr", type=float, default=2e-3, help="peak (one-cycle) AdamW learning rate")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (fixed for determinism; results depend on it). "
                        "Use 1 on a busy machine: 2 threads on 2 contended cores run several times slower")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N train digits (tests)")
    p.add_argument("--no-augment", action="store_true", help="disable the random affine augmentation")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.input_size < 32:
        p.error("--input-size must be >= 32")
    return args


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    # Restore torch's global settings afterwards: tests call main() inside a shared process.
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        model, config, metrics = train(args)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    out = write_cam_dir(args.out, model.state_dict(), config, digit_calibration())
    total = time.perf_counter() - t0
    h, w = metrics["cam_map_size"]
    print(f"held-out accuracy: {metrics['heldout_accuracy']:.4f} ({metrics['heldout_count']} digits)")
    print(f"input {args.input_size}px, layer4 map {h}x{w}, {args.epochs} epoch(s), "
          f"train {metrics['train_seconds']:.1f} s, wall time {total:.1f} s")
    if h < 4 or w < 4:
        print(f"warning: layer4 map is {h}x{w}; use --input-size >= 112 for a meaningful CAM",
              file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
