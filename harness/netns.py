"""Network namespaces of a test's own: a server binds config files' fixed ports without meeting a
`make start` server, and a second namespace joined to the first by a veth pair plays another
machine, which reaches only what the server binds beyond loopback.

Needs root, util-linux's unshare/nsenter and iproute2's ip (`Unavailable` says which is missing).
Each namespace is held by a sleeping process; on exit every process that entered it (TorchServe's
java, its workers) is killed, then the holder, which takes the namespace and its veth end with it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import REPO

ACTIVATE = REPO / ".venv" / "bin" / "activate"


class Unavailable(RuntimeError):
    """This machine or user cannot make network namespaces (the message says why)."""


class NetNs:
    """A network namespace held by `holder`; `enter` prefixes a command that runs in it."""

    def __init__(self, holder: subprocess.Popen):
        self.holder = holder
        self.enter = ["nsenter", "-t", str(holder.pid), "-n"]
        self.ns = os.readlink(f"/proc/{holder.pid}/ns/net")

    def others(self) -> list[int]:
        """The processes in the namespace besides the holder (they all entered it through us)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != self.holder.pid:
                try:
                    if os.readlink(proc / "ns" / "net") == self.ns:
                        pids.append(int(proc.name))
                except OSError:  # exited, or a kernel thread
                    pass
        return pids

    def ip(self, *args: str) -> None:
        subprocess.run([*self.enter, "ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def shell(self, root: Path, env: dict, command: str, log: Path, timeout: float) -> int:
        """A user's shell in the namespace: the repo's venv activated, in root. Output goes to
        log (a daemon started here inherits it: never a pipe a test would wait on)."""
        with open(log, "ab") as out:
            return subprocess.run([*self.enter, "bash", "-c", f'source "{ACTIVATE}" && cd "{root}" && {command}'],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode

    def python(self, script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """The repo's python running `script` in the namespace, from the repo root."""
        return subprocess.run([*self.enter, str(REPO / ".venv" / "bin" / "python"), "-c", script, *args],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        for pid in self.others():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.others() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.holder.kill()
        self.holder.communicate(timeout=10)


def user_env(root: Path) -> dict:
    """A user's environment for a server started in a namespace from `root`: no TS_CONFIG_FILE
    before activate, no PYTHONPATH (handlers come from the archive); TMPDIR/TEMP in root/tmp, so
    the server has its own pid file (`--stop` stops this server only) and worker sockets."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    env.update(TMPDIR=str(root / "tmp"), TEMP=str(root / "tmp"), TMP=str(root / "tmp"))
    return env


@contextmanager
def namespace() -> Iterator[NetNs]:
    """A new network namespace with its loopback up."""
    if os.geteuid() != 0:
        raise Unavailable("not running as root")
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not found; unshare and nsenter come with util-linux, "
                          "ip with iproute2")
    holder = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "up":  # `up` once lo is up in the new namespace
        holder.kill()
        _, err = holder.communicate(timeout=10)
        raise Unavailable(f"`unshare -n` + `ip link set lo up` failed: {err.strip()}")
    ns = NetNs(holder)
    try:
        if ns.ns == os.readlink("/proc/self/ns/net"):
            raise Unavailable("unshare -n left the host's namespace")
        yield ns
    finally:
        ns.close()


def link(a: NetNs, b: NetNs, address_a: str, address_b: str, prefix: int = 30) -> None:
    """A veth pair between a and b (`veth-a` in a, `veth-b` in b) with the two addresses."""
    a.ip("link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", str(b.holder.pid))
    for ns, dev, address in ((a, "veth-a", address_a), (b, "veth-b", address_b)):
        ns.ip("addr", "add", f"{address}/{prefix}", "dev", dev)
        ns.ip("link", "set", dev, "up")
