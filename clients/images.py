"""Contact sheets of the images the clients receive, with Pillow only (the clients need no torch)."""
from __future__ import annotations

import math

from PIL import Image


def tile(images: list[Image.Image], nrow: int, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """The images (all of one size) in rows of `nrow`, `padding` pixels of grey `pad_value` around
    and between them: torchvision.utils.make_grid's layout, pixel for pixel (one image alone is
    returned as it is, without a border, as make_grid does)."""
    images = [img.convert("RGB") for img in images]
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    cols = min(nrow, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (width + padding) + padding, rows * (height + padding) + padding),
                      (pad_value,) * 3)
    for k, img in enumerate(images):
        row, col = divmod(k, cols)
        sheet.paste(img, (col * (width + padding) + padding, row * (height + padding) + padding))
    return sheet
