"""The weights' content hash archive.sh records as `weights_sha256` (archive.json; the first ten
hex digits are "Model hash" in the PNGs): a single file's own sha256 (the hash AUTOMATIC1111 and
civitai show for a checkpoint), or for a directory the sha256 of `sha256sum`'s listing of every
file in it (`<hex>  ./<path>` lines, paths in byte order, symlinks followed).

    python -m weights.sha256 PATH      -> prints the hash

Why not `sha256sum` itself: coreutils' build here has no SHA instructions and reads a few hundred
MB/s, so hashing GBs of SD weights took several times the archive's copy of them. hashlib
(OpenSSL: SHA-NI / ARMv8 SHA2 where the CPU has them) is about four times faster, and the files
of a directory are hashed in parallel threads (hashlib releases the GIL).

Each file's hash is cached by its resolved path, size and modification time, the identity
archive.sh's fingerprint already gives weights files (as AUTOMATIC1111 caches checkpoint hashes):
re-archiving the same weights reads nothing. The cache is a JSON file,
`$WEIGHTS_SHA256_CACHE` or `${XDG_CACHE_HOME:-~/.cache}/torchserve-models/weights-sha256.json`;
where it cannot be read or written, every file is hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weights.atomic import atomic_file


def cache_path() -> Path:
    if os.environ.get("WEIGHTS_SHA256_CACHE"):
        return Path(os.environ["WEIGHTS_SHA256_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "torchserve-models" / "weights-sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_of(root: Path) -> list[str]:
    """Every file under `root` (`find -L . -type f`), relative, in byte order of the path."""
    found = []
    for top, _, names in os.walk(root, followlinks=True):
        found += [os.path.relpath(os.path.join(top, n), root) for n in names if os.path.isfile(os.path.join(top, n))]
    return sorted(found, key=os.fsencode)


class Hasher:
    """File hashes through the cache; `save()` writes back what was added."""

    def __init__(self, cache: Path):
        self.cache = cache
        try:
            self.known = json.loads(cache.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.added = False

    def __call__(self, path: Path) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        identity = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(real)
        if entry and entry[:2] == identity:
            return entry[2]
        digest = file_sha256(real)
        self.known[real] = [*identity, digest]
        self.added = True
        return digest

    def save(self) -> None:
        if not self.added:
            return
        known = {path: entry for path, entry in self.known.items() if os.path.exists(path)}  # gone: forgotten
        try:
            with atomic_file(self.cache) as tmp:
                tmp.write_text(json.dumps(known))
        except OSError:
            pass  # a read-only home: the next archive hashes again


def weights_sha256(path: Path, cache: Path | None = None) -> str:
    hasher = Hasher(cache or cache_path())
    try:
        if path.is_file():
            return hasher(path)
        files = files_of(path)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            digests = list(pool.map(lambda rel: hasher(path / rel), files))
        listing = "".join(f"{d}  ./{rel}\n" for d, rel in zip(digests, files))
        return hashlib.sha256(listing.encode()).hexdigest()
    finally:
        hasher.save()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(sys.argv[1]):
        sys.exit("usage: python -m weights.sha256 PATH (a weights directory or file)")
    print(weights_sha256(Path(sys.argv[1])))
