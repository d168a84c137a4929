"""Fine-tunes the `cam` classifier on your own labelled images and writes a cam weights directory
that archive.sh turns into a new version of `cam` (CAM keeps working: same architecture, same
target layer).

    python -m weights.finetune_cam DATA_DIR [--base weights/demo/cam] [--out weights/finetuned/cam]
                                   [--epochs 3] [--val-fraction 0.2] [--seed 0]

DATA_DIR is a class-per-subfolder image folder as torchvision.datasets.ImageFolder reads it
(DATA_DIR/<class>/*.png); a DATA_DIR/train subfolder is used when present. Training starts from
the base weights; when the folder's classes differ from the base labels the final layer is
replaced. Preprocessing (size, mean/std, grayscale) is the base model's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from weights.build_cam_demo import build_preprocess, set_determinism, write_cam_dir


class DataError(ValueError):
    """The image folder cannot be used for fine-tuning; the message says why."""


def load_folder(root: Path, transform) -> ImageFolder:
    root = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    try:
        data = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:  # ImageFolder's words for "no class folders / no images"
        raise DataError(f"{root}: {exc}") from None
    if len(data.classes) < 2:
        raise DataError(f"{root} has {len(data.classes)} class folder(s); fine-tuning a classifier needs >= 2")
    for path, _ in data.samples:  # fail before training, naming the file
        try:
            data.loader(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise DataError(f"{path} is not a readable image ({type(exc).__name__})") from None
    return data


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DataError(f"only {n} images: nothing left to train on after the held-out split")
    return sorted(order[n_val:]), sorted(order[:n_val])


def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def finetune(data_dir: Path, base: Path, out: Path, epochs: int = 3, val_fraction: float = 0.2,
             lr: float = 1e-3, batch_size: int = 32, seed: int = 0, threads: int = 2,
             max_steps: int | None = None) -> dict:
    set_determinism(seed, threads)
    cfg = json.loads((base / "cam_config.json").read_text())
    data = load_folder(data_dir, build_preprocess(cfg))
    model = torchvision.models.get_model(cfg["arch"], num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    replaced = data.classes != list(cfg["labels"])
    if replaced:
        model.fc = torch.nn.Linear(model.fc.in_features, len(data.classes))
    train_idx, val_idx = split(len(data), val_fraction, seed)
    train = DataLoader(Subset(data, train_idx), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(Subset(data, val_idx), batch_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history, steps, start = [], 0, time.time()
    for epoch in range(epochs):
        model.train()
        bar = tqdm(train, desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        total_loss = 0.0
        for x, y in bar:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(y)
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if max_steps and steps >= max_steps:
                break
        val_acc = accuracy(model, val)
        history.append({"epoch": epoch + 1, "train_loss": round(total_loss / len(train_idx), 4),
                        "val_accuracy": round(val_acc, 4)})
        print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, held-out accuracy {val_acc:.3f}")
        if max_steps and steps >= max_steps:
            break
    new_cfg = {**cfg, "num_classes": len(data.classes), "labels": list(data.classes),
               "profile": "finetuned", "source": f"fine-tuned from {base} on {data_dir}",
               "metrics": {"heldout_accuracy": history[-1]["val_accuracy"], "history": history,
                           "train_count": len(train_idx), "heldout_count": len(val_idx),
                           "head_replaced": replaced, "train_seconds": round(time.time() - start, 1)}}
    write_cam_dir(out, model.state_dict(), new_cfg)
    return new_cfg["metrics"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--base", type=Path, default=Path("weights/demo/cam"), help="cam weights to start from")
    parser.add_argument("--out", type=Path, default=Path("weights/finetuned/cam"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (tests)")
    args = parser.parse_args(argv)
    try:
        metrics = finetune(args.data_dir, args.base, args.out, args.epochs, args.val_fraction, args.lr,
                           seed=args.seed, threads=args.threads, max_steps=args.max_steps)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (held-out accuracy {metrics['heldout_accuracy']:.3f}); archive it as a new "
          f"version: ./archive.sh --weights {args.out} --version 2.0 cam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
