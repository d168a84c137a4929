"""The aarch64 userland that `make test-arm64` builds (harness/arm64_userland.sh): where it is and
how to run its python on this x86 machine (binfmt runs the aarch64 binary under qemu;
QEMU_LD_PREFIX makes qemu find the userland's loader, libraries and stdlib)."""
from __future__ import annotations

import os
from pathlib import Path

from harness import REPO

STORE = REPO / "model_store" / "arm64"  # archives built with --target arm64 (make test-arm64)


def root() -> Path | None:
    """$ARM64_ROOT when it holds a userland with the project's venv, else None."""
    path = os.environ.get("ARM64_ROOT")
    return Path(path) if path and (Path(path) / "opt/venv/bin/python").is_file() else None


def python(userland: Path) -> Path:
    return userland / "opt/venv/bin/python"


def env(userland: Path) -> dict:
    # qemu looks every absolute path up in the prefix first: the userland's /tmp hides the host's,
    # while paths the userland lacks (the repo, a server's own TMPDIR /tmp/ts-instance-*) are the host's.
    return {"QEMU_LD_PREFIX": str(userland)}
