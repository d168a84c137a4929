"""Fine-tune the `cam` classifier on your own labelled images; writes a cam weights directory that
archive.sh turns into a new version of `cam` (CAM keeps working: same architecture, target layer
and preprocessing as the base).

    python -m lab.finetune_cam DATA_DIR [--base weights/demo/cam | model_store/cam.mar]
                                   [--out weights/finetuned/cam] [--epochs 3] [--val-fraction 0.2]
                                   [--lr 1e-3] [--batch-size 32] [--seed 0] [--threads 2]
    ./archive.sh --weights weights/finetuned/cam --version 2.0 cam      # -> model_store/cam-2.0.mar

DATA_DIR has one subfolder per class, as torchvision.datasets.ImageFolder reads it
(DATA_DIR/<class>/<image>); when DATA_DIR/train exists, that is used. A stratified part of it
(--val-fraction) is held out for the per-epoch accuracy. The base is a cam weights directory
(model.safetensors + cam_config.json) or a cam archive (.mar). When the folder's classes differ
from the base labels, the final layer is replaced (rows of classes the base knows by name are
kept); the class names become the new version's labels.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from handlers.cam import classifier as cam_model
from handlers.cam.classifier import CONFIG_NAME, WEIGHTS_NAME
from weights.build_cam_demo import CALIBRATION_COUNT, set_determinism, write_cam_dir
from weights.image_folder import ImageFolderError, read_image_folder

DEFAULT_BASE = "weights/demo/cam"
DEFAULT_OUT = "weights/finetuned/cam"


class FinetuneError(ValueError):
    """The data folder or the base weights cannot be used; the message says why."""


# --------------------------------------------------------------------------- inputs


def read_base(base: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """cam_config.json + state dict from a cam weights directory or a cam archive (.mar)."""
    try:
        if base.is_dir():
            cfg, weights = (base / CONFIG_NAME).read_bytes(), (base / WEIGHTS_NAME).read_bytes()
        elif zipfile.is_zipfile(base):
            with zipfile.ZipFile(base) as mar:
                cfg, weights = mar.read(f"weights/{CONFIG_NAME}"), mar.read(f"weights/{WEIGHTS_NAME}")
        else:
            raise FinetuneError(f"base {base} is neither a cam weights directory nor a .mar archive")
    except (OSError, KeyError) as exc:
        raise FinetuneError(f"base {base} has no cam weights ({CONFIG_NAME} + {WEIGHTS_NAME}): {exc}") from None
    try:
        config = cam_model.parse_config(cfg, f"{CONFIG_NAME} of {base}")
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None
    return config, load_safetensors(weights)


def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / held-out indices with each class's share of images held out."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in sorted(set(targets)):
        idx = [i for i, t in enumerate(targets) if t == c]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)  # a lone image trains
        val += idx[:n_val]
        train += idx[n_val:]
    if not val:
        raise FinetuneError(f"only {len(targets)} images, none can be held out: every class needs >= 2")
    return sorted(train), sorted(val)


def adapt_head(model: torch.nn.Module, layer: str, base_labels: list[str], classes: list[str]) -> int | None:
    """Replaces the final layer when the classes differ from the base labels; returns how many
    rows were kept (classes the base knows by name), None when the head was kept as it is."""
    if classes == base_labels:
        return None
    old = model.get_submodule(layer)
    new = torch.nn.Linear(old.in_features, len(classes))
    kept = 0
    with torch.no_grad():
        for j, name in enumerate(classes):
            if name in base_labels:
                new.weight[j] = old.weight[base_labels.index(name)]
                new.bias[j] = old.bias[base_labels.index(name)]
                kept += 1
    parent, _, attr = layer.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return kept


# --------------------------------------------------------------------------- training


def run_epoch(model, loader, desc: str, opt=None, sched=None, limit: int | None = None) -> tuple[float, float]:
    """One pass over loader (at most `limit` batches; training when opt is given) -> (loss, accuracy)."""
    model.train(opt is not None)
    loss_sum, correct, seen = 0.0, 0, 0
    total = len(loader) if limit is None else min(limit, len(loader))
    bar = tqdm(itertools.islice(loader, total), total=total, desc=desc, unit="batch", file=sys.stderr,
               dynamic_ncols=True, leave=False)
    with torch.set_grad_enabled(opt is not None):
        for x, y in bar:
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def finetune(data_dir: Path, base: Path, out: Path, epochs: int = 3, val_fraction: float = 0.2,
             lr: float = 1e-3, batch_size: int = 32, seed: int = 0, threads: int = 2,
             max_steps: int | None = None) -> dict:
    """Fine-tunes and writes `out` (atomically); returns the metrics stored in its cam_config.json.
    max_steps stops early (tests). torch's global settings are restored afterwards."""
    start = time.perf_counter()
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(seed, threads)
        cfg, state = read_base(Path(base))
        data = read_image_folder(Path(data_dir), "train", cam_model.preprocess(cfg), min_classes=2)
        model = cam_model.build_model(cfg)
        model.load_state_dict(state)
        kept = adapt_head(model, cfg["classifier_layer"], list(cfg["labels"]), data.classes)
        model = model.to(memory_format=torch.channels_last)
        train_idx, val_idx = stratified_split(data.targets, val_fraction, seed)
        train = DataLoader(Subset(data, train_idx), batch_size=batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))
        val = DataLoader(Subset(data, val_idx), batch_size=64)
        steps = epochs * len(train) if not max_steps else min(max_steps, epochs * len(train))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        print(f"fine-tuning {cfg['arch']} from {base} on {data.root}: {len(data.classes)} classes, "
              f"{len(train_idx)} train / {len(val_idx)} held-out images, "
              + ("same head" if kept is None else f"new head ({kept} of {len(data.classes)} rows kept)"),
              flush=True)
        history = []
        if kept is None:  # the base model on the held-out split: what fine-tuning starts from
            loss, acc = run_epoch(model, val, "base held-out")
            history.append({"epoch": 0, "heldout_loss": round(loss, 4), "heldout_accuracy": round(acc, 4)})
            print(f"epoch 0 (base): held-out loss {loss:.4f} acc {acc:.3f}", flush=True)
        for epoch in range(1, epochs + 1):
            left = steps - (epoch - 1) * len(train)
            if left <= 0:
                break
            t0 = time.perf_counter()
            train_loss, train_acc = run_epoch(model, train, f"epoch {epoch}/{epochs}", opt, sched, limit=left)
            loss, acc = run_epoch(model, val, "held-out")
            history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "train_accuracy": round(train_acc, 4),
                            "heldout_loss": round(loss, 4), "heldout_accuracy": round(acc, 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.3f} | "
                  f"held-out loss {loss:.4f} acc {acc:.3f} ({history[-1]['seconds']:.0f} s)", flush=True)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    metrics = {
        "heldout_accuracy": history[-1]["heldout_accuracy"],
        "heldout_loss": history[-1]["heldout_loss"],
        "heldout_count": len(val_idx),
        "train_count": len(train_idx),
        "history": history,
        "head": "kept" if kept is None else f"replaced ({kept} rows kept)",
        "steps": steps, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "threads": threads,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    new_cfg = {**cfg, "num_classes": len(data.classes), "labels": list(data.classes), "profile": "finetuned",
               "source": f"fine-tuned by lab/finetune_cam.py from {base} ({cfg.get('profile', '?')} "
                         f"profile) on {data.root}", "metrics": metrics}
    calibration = [data.loader(data.samples[i][0]) for i in train_idx[:CALIBRATION_COUNT]]  # its own domain
    write_cam_dir(out, model.to(memory_format=torch.contiguous_format).state_dict(), new_cfg, calibration)
    return metrics


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.finetune_cam", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="class-per-subfolder image folder (its train/ if present)")
    parser.add_argument("--base", type=Path, default=Path(DEFAULT_BASE),
                        help="cam weights directory or cam .mar archive to start from")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output weights directory (replaced)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak (one-cycle) AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; 1 is faster when other jobs share the cores")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (tests)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--epochs, --batch-size and --threads must be >= 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be in (0, 1)")
    try:
        metrics = finetune(args.data_dir, args.base, args.out, args.epochs, args.val_fraction, args.lr,
                           args.batch_size, args.seed, args.threads, args.max_steps)
    except (FinetuneError, ImageFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"held-out accuracy {metrics['heldout_accuracy']:.4f} ({metrics['heldout_count']} images), "
          f"{metrics['train_seconds']:.0f} s")
    print(f"wrote {args.out}; archive it as a new version of cam:\n"
          f"  ./archive.sh --weights {args.out} --version 2.0 cam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
