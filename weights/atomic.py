"""Atomic replacement of an output directory or file: a run that fails or is killed leaves either
the previous one or the new one, never a half-written one."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into `tmp`, an empty directory next to `out` (same
    filesystem). When the block succeeds, `tmp` gets the umask's usual modes (mkdtemp and
    safetensors create owner-only ones) and is renamed to `out`; a previous `out` is moved aside
    first and deleted only once the new one is in place. When the block fails, `tmp` is removed
    and `out` is untouched."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _normalise_permissions(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_file(out) as tmp:` write the file `tmp` (named like `out`, in a scratch directory
    next to it); when the block succeeds it gets the umask's usual modes and is renamed to `out`."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        yield Path(tmp) / out.name
        _normalise_permissions(Path(tmp))
        os.replace(Path(tmp) / out.name, out)


def _normalise_permissions(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`. A directory cannot be renamed onto a non-empty one, so the old `out`
    is renamed aside first and put back if the second rename fails."""
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside / out.name, out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
