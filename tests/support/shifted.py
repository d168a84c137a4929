"""Tiny labelled folders of shifted digits (ImageFolder layout) for the fine-tuning lab's tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lab import make_shifted_digits
from weights import digits


def tiny_folder(root: Path, per_class: int = 3, classes=range(10), seed: int = 0) -> Path:
    """root/<digit>/<index>.png: the first `per_class` held-out digits of each class, shifted."""
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    idx = np.concatenate([test[labels[test] == c][:per_class] for c in classes])
    make_shifted_digits.write_split(root, idx, images, labels, make_shifted_digits.DEFAULT_SIZE, seed)
    return root
