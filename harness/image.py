"""The serving image (`make image`, deploy/Dockerfile) run with podman as an operator runs it, for
tests/image (`make test-image`): `podman run` with the inference port published on loopback, the
models baked in or a model store mounted, the token read from the container with `podman exec`.
Also records the image figures in benchmarks/results/image.json (`python -m harness.image`).

The container config deploy/image/containers.conf (runc, no default ulimits) applies to every
podman call made here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clients.api import TorchServeClient
from harness import REPO
from harness.torchserve import free_port

CONTAINERS_CONF = REPO / "deploy" / "image" / "containers.conf"
RESULTS = REPO / "benchmarks" / "results" / "image.json"
KEY_FILE = "/home/model-server/key_file.json"
STORE = "/mnt/models/model-store"
# What `podman exec` runs inside the container to see the workers (management is on loopback there).
WORKERS = """
import json, os, urllib.request
auth = {}
if os.path.exists("key_file.json"):  # none when the config turns token authorization off
    auth = {"Authorization": "Bearer " + json.load(open("key_file.json"))["management"]["key"]}
def get(path):
    req = urllib.request.Request("http://127.0.0.1:8081" + path, headers=auth)
    return json.load(urllib.request.urlopen(req, timeout=10))
out = {}
for m in get("/models")["models"]:
    out[m["modelName"]] = [w["status"] for d in get("/models/" + m["modelName"]) for w in d["workers"]]
print(json.dumps(out))
"""


def podman(*args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


class Container:
    """One `podman run -d` of the image. store: a host directory mounted read-only over the baked
    model store; None serves the baked models. command, env: another command line and environment
    (the Kubernetes Deployment's), serving on container_port."""

    def __init__(self, image: str, name: str, store: Path | None = None, stop_timeout: int = 120,
                 command: list[str] | None = None, env: dict[str, str] | None = None, container_port: int = 8080):
        self.image, self.name, self.store, self.stop_timeout = image, name, store, stop_timeout
        self.command, self.env, self.container_port = command or [], env or {}, container_port
        self.port = free_port()
        self.key_dir = Path(tempfile.mkdtemp(prefix="ts-image-"))
        self.started_at = 0.0

    def run(self) -> None:
        podman("rm", "-f", "--ignore", self.name)
        mount = ["-v", f"{self.store}:{STORE}:ro"] if self.store else []
        self.started_at = time.monotonic()
        env = [f"--env={k}={v}" for k, v in self.env.items()]
        podman("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:{self.container_port}",
               "--stop-timeout", str(self.stop_timeout), *mount, *env, self.image, *self.command)

    def start(self) -> None:
        """`podman start` of the stopped container (same filesystem, new processes, new token)."""
        self.started_at = time.monotonic()
        podman("start", self.name)

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=check)

    def key_file(self) -> Path:
        """The container's key_file.json, copied out with `podman exec` (the operator's way); the
        path names no file when the container has none (the client then sends no token)."""
        proc = self.exec("cat", KEY_FILE, check=False)
        path = self.key_dir / "key_file.json"
        path.unlink(missing_ok=True)
        if proc.returncode == 0 and proc.stdout.strip():
            path.write_text(proc.stdout)
        return path

    def workers(self) -> dict[str, list[str]]:
        proc = self.exec("python", "-c", WORKERS, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}

    def client(self, **kwargs) -> TorchServeClient:
        return TorchServeClient(inference_url=self.url, key_file=self.key_file(), **kwargs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, models: int, timeout: float = 600) -> float:
        """Until `models` models have every worker READY and /ping answers through the published
        port; returns the seconds since run()/start()."""
        deadline = time.monotonic() + timeout
        last = "nothing yet"
        while time.monotonic() < deadline:
            state = self.state()
            if not state.get("Running"):
                raise RuntimeError(f"container {self.name} is not running ({state.get('Status')}):\n{self.logs()[-4000:]}")
            workers = self.workers()
            if len(workers) >= models and all(w and all(s == "READY" for s in w) for w in workers.values()):
                try:
                    if self.client().ping().get("status") == "Healthy":
                        return time.monotonic() - self.started_at
                except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                    last = f"ping: {exc}"
            else:
                last = f"workers: {workers}"
            time.sleep(1)
        raise TimeoutError(f"{self.name} not READY after {timeout:.0f} s ({last}):\n{self.logs()[-4000:]}")

    def stop(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """`podman stop`: SIGTERM (the image's STOPSIGNAL), SIGKILL after stop_timeout."""
        return podman("stop", self.name, timeout=timeout)

    def remove(self) -> None:
        podman("rm", "-f", "--ignore", self.name, check=False)
        shutil.rmtree(self.key_dir, ignore_errors=True)


def record(**figures) -> dict:
    """Merges figures into benchmarks/results/image.json (make image and make test-image both write)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.image",
                                     description="record a built image's size and build time in " + str(RESULTS.relative_to(REPO)))
    parser.add_argument("image")
    parser.add_argument("--build-seconds", type=float, required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--log", type=Path, help="podman build's output: which steps came from the cache")
    args = parser.parse_args(argv)
    size = image_size(args.image)
    figures = dict(image=args.image, base_image=args.base, size_bytes=size, size_gb=round(size / 1e9, 2),
                   built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    note = ""
    if args.log and args.log.exists():
        text = args.log.read_text(errors="replace")
        runs = sum(1 for line in text.splitlines() if line.startswith("STEP ") and ": FROM " not in line)
        cached = text.count("--> Using cache")
        figures.update(last_build_seconds=round(args.build_seconds), last_build_steps=runs,
                       last_build_steps_from_cache=cached)
        # The dependencies' layer (pip) rebuilt: the figure of a build from scratch (on this base).
        if "Successfully installed" in text:
            figures.update(uncached_build_seconds=round(args.build_seconds))
        note = f", {cached} of {runs} steps from the cache"
    record(**figures)
    print(f"[image] {args.image}: {size / 1e9:.2f} GB (built in {args.build_seconds:.0f} s{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
