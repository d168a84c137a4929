"""Tiny labelled folders of shifted digits (ImageFolder layout) for the fine-tuning lab's tests."""
from __future__ import annotations

from PIL import Image

from weights import digits, make_shifted_digits


def tiny_folder(root, per_class=3, classes=range(10)):
    """A few shifted digits per class in ImageFolder layout."""
    images, labels = digits.load_arrays()
    for c in classes:
        idx = [i for i in range(len(labels)) if labels[i] == c][:per_class]
        for i, arr in zip(idx, make_shifted_digits.shift(images[idx], 64, seed=c)):
            (root / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / str(c) / f"{i}.png")
    return root
