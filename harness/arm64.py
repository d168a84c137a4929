"""The aarch64 userland that `make test-arm64` builds (harness/arm64_userland.sh): where it is and
how to run its python on this x86 machine (binfmt runs the aarch64 binary under qemu;
QEMU_LD_PREFIX makes qemu find the userland's loader, libraries and stdlib).

`python -m harness.arm64 ARGS...` runs the userland's python with ARGS ($ARM64_ROOT), the repo
root on its path (PYTHONPATH): the emulated pytest imports handlers and tests from this tree, as
the host's does from its root. Not in env(): TorchServe's workers import handlers from the archives.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from harness import REPO

# archives built with --target arm64 (make test-arm64); not under model_store/, which
# `torchserve --start` serves whole
STORE = REPO / ".arm64" / "model_store"


def root() -> Path | None:
    """$ARM64_ROOT when it holds a userland with the project's venv, else None."""
    path = os.environ.get("ARM64_ROOT")
    return Path(path) if path and (Path(path) / "opt/venv/bin/python").is_file() else None


def python(userland: Path) -> Path:
    return userland / "opt/venv/bin/python"


def env(userland: Path) -> dict:
    # qemu looks every absolute path up in the prefix first: the userland's /tmp hides the host's,
    # while paths the userland lacks (the repo, a server's own TMPDIR /tmp/ts-instance-*) are the host's.
    # OpenMP threads that spin while waiting cost emulated instructions on a shared 2-core host
    # (a cam batch: 15 s spinning, 10.5 s passive); the device's threads setting is unchanged.
    # QEMU_CPU: the arm64 target's core (a Raspberry Pi 5's Cortex-A76). Under qemu's default model
    # ("max", every optional extension) torch ran about 3x slower here (its import, convolutions,
    # the cam's int8 calibration at load).
    return {"QEMU_LD_PREFIX": str(userland), "OMP_WAIT_POLICY": "PASSIVE", "QEMU_CPU": "cortex-a76"}


if __name__ == "__main__":
    userland = root()
    if userland is None:
        sys.exit(f"ARM64_ROOT={os.environ.get('ARM64_ROOT')!r} is not a userland built by harness/arm64_userland.sh")
    exe = str(python(userland))
    os.execve(exe, [exe, *sys.argv[1:]], {**os.environ, **env(userland), "PYTHONPATH": str(REPO)})
