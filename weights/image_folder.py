"""The one reader of labelled image folders (root/<class>/<image>, torchvision's ImageFolder layout),
for fine-tuning (lab/finetune_cam.py) and for comparing versions (lab/compare.py): the same
rules for both, and a one-line error naming the folder or the file that is wrong."""
from __future__ import annotations

import sys
from pathlib import Path

from torchvision.datasets import ImageFolder


class ImageFolderError(ValueError):
    """The folder cannot be used; the message says why in one line."""


def read_image_folder(root: Path, split: str | None = None, transform=None, min_classes: int = 1) -> ImageFolder:
    """torchvision's ImageFolder of root/<split> when that folder exists, else of root, checked
    before any use: a directory, >= min_classes class folders, each with an image (an image is a
    file with one of torchvision's image extensions, in the class folder or below it), and every
    image decodable. Other files are skipped with a note on stderr."""
    root = Path(root)
    if split and (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a directory")
    try:
        data = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:  # ImageFolder's words for "no class folders" / "a class without images"
        raise ImageFolderError(f"{root}: {exc}") from None
    if len(data.classes) < min_classes:
        raise ImageFolderError(f"{root} has {len(data.classes)} class folder ({', '.join(data.classes)}); "
                               f"at least {min_classes} needed (one subfolder per class)")
    for path, _ in data.samples:  # fail before training or sending, naming the file
        try:
            data.loader(path)
        except Exception as exc:  # noqa: BLE001 - any undecodable file is reported the same way
            raise ImageFolderError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
    used = {Path(p) for p, _ in data.samples}
    skipped = [p for c in data.classes for p in sorted((root / c).rglob("*")) if p.is_file() and p not in used]
    if skipped:
        print(f"note: ignored {len(skipped)} file(s) without an image extension, e.g. {skipped[0]}",
              file=sys.stderr)
    return data
