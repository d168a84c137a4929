"""weights/sha256.py gives the hash coreutils' `sha256sum` gives (a directory: the sha256 of its
listing, archive.sh's former pipeline), and its per-file cache follows size and mtime."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from weights.sha256 import weights_sha256


def coreutils(path: Path) -> str:
    if path.is_file():
        cmd = f"sha256sum < '{path}'"
    else:
        cmd = f"cd '{path}' && find -L . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum | sha256sum"
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout.split()[0]


def tree(root: Path) -> Path:
    """Names whose byte order differs from other orders, nesting, a symlinked file and folder, an empty file."""
    for rel, data in {"a/b.bin": b"1" * 5000, "a-b": b"2", "B.json": b"{}", "unet/x.safetensors": os.urandom(70000),
                      "empty": b""}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    outside = root.parent / "blobs"
    outside.mkdir()
    (outside / "blob").write_bytes(b"linked")
    (root / "linked.bin").symlink_to(outside / "blob")
    (root / "linked-dir").symlink_to(root / "a")
    return root


def test_the_same_hash_as_sha256sum(tmp_path):
    weights = tree(tmp_path / "w")
    cache = tmp_path / "cache.json"
    assert weights_sha256(weights, cache) == coreutils(weights)
    assert weights_sha256(weights / "unet/x.safetensors", cache) == coreutils(weights / "unet/x.safetensors")
    assert weights_sha256(weights, cache) == coreutils(weights)  # from the cache


def test_the_cache_follows_size_and_mtime(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    cache = tmp_path / "c" / "cache.json"
    first = weights_sha256(f, cache)
    assert cache.is_file()
    stat = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, mtime put back: the same identity, the cached hash
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_sha256(f, cache) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert weights_sha256(f, cache) == coreutils(f) != first


def test_an_unusable_cache_still_hashes(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    (tmp_path / "not-a-dir").write_text("")
    cache = tmp_path / "not-a-dir" / "cache.json"
    assert weights_sha256(f, cache) == coreutils(f)
    (tmp_path / "bad.json").write_text("{not json")
    assert weights_sha256(f, tmp_path / "bad.json") == coreutils(f)
