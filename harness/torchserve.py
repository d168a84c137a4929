"""Starts and stops a private TorchServe for tests, benchmarks and the fine-tuning lab.

Each instance gets free loopback ports (REST, gRPC, worker sockets), its own working directory
(key_file.json, logs), its own TMPDIR/TEMP (so instances don't share the pid file or unpacked
archives) and its own model store holding links to archives built by archive.sh. It is stopped
(the whole process group) on exit, also when the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from clients.api import TorchServeClient
from deploy.kserve_layout import parse_properties
from harness import REPO

VENV_BIN = REPO / ".venv" / "bin"


def run_archive_sh(*args: str, model_configs: Path | None = None) -> subprocess.CompletedProcess:
    """./archive.sh with `args` (text output captured, not checked); `model_configs`: the model
    configs directory it reads (MODEL_CONFIGS) instead of the repo's."""
    env = {**os.environ, "MODEL_CONFIGS": str(model_configs)} if model_configs else None
    return subprocess.run([str(REPO / "archive.sh"), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)


def model_configs_with(out: Path, overrides: dict[tuple[str, str], dict]) -> Path:
    """A copy of the repo's model_configs/ at `out` in which `overrides[(model, target)]` replaces
    keys of that yaml's `handler:` section (for run_archive_sh's `model_configs`)."""
    shutil.copytree(REPO / "model_configs", out)
    for (model, target), handler in overrides.items():
        path = out / model / f"{target}.yaml"
        config = yaml.safe_load(path.read_text())
        config["handler"].update(handler)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def key_file_written(path: Path) -> bool:
    """TorchServe's key_file.json exists and is complete: it is created empty, then written (a
    reader in between gets '')."""
    try:
        return bool(json.loads(Path(path).read_text()))
    except (FileNotFoundError, ValueError):
        return False


def read_properties(path: Path) -> dict[str, str]:
    """A TorchServe .properties file's settings (comments and blank lines left out)."""
    return parse_properties(Path(path).read_text())


def wait_listening(client: TorchServeClient, timeout: float = 60.0) -> None:
    """Until the management API answers: TorchServe writes its key file before it binds the
    listeners, so a client that waited for the file may still find nothing listening."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_models()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServeInstance:
    """`with TorchServeInstance(archives=["cam.mar"]) as ts: ts.client.predict(...)`.

    archives: names of entries in the repo's model_store/ put into the private store (linked,
    not copied); all of them are loaded at start (`load_models=all`) unless load_at_start is
    False, in which case the test registers them through the management API. extra: more
    config.properties lines (override the repo's values). python: the interpreter that runs
    TorchServe's launcher, and hence the workers (the frontend starts them with the launcher's
    sys.executable); default the repo's .venv. env: more environment variables for the server
    (e.g. QEMU_LD_PREFIX for an emulated aarch64 python, harness/arm64.py).
    """

    def __init__(self, archives: list[str] | None = None, extra: dict | None = None,
                 source_store: Path | None = None, startup_timeout: float = 300.0,
                 load_at_start: bool = True, python: Path | None = None, env: dict | None = None):
        self.python = Path(python or VENV_BIN / "python")
        self.env = env or {}
        self.archives = archives or []
        self.load_at_start = load_at_start and bool(self.archives)
        self.extra = extra or {}
        self.source_store = Path(source_store or REPO / "model_store")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def _config(self) -> str:
        props = read_properties(REPO / "config.properties")
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_i", "grpc_m")}
        props.update(
            inference_address=f"http://127.0.0.1:{self.ports['inference']}",
            management_address=f"http://127.0.0.1:{self.ports['management']}",
            metrics_address=f"http://127.0.0.1:{self.ports['metrics']}",
            grpc_inference_port=str(self.ports["grpc_i"]),
            grpc_management_port=str(self.ports["grpc_m"]),
            # Worker sockets are numbered from here; spread instances apart.
            initial_worker_port=str(20000 + (os.getpid() * 37 + self.ports["inference"]) % 20000),
            model_store=str(self.store),
            load_models="all" if self.load_at_start else "",
        )
        props.update({k: str(v) for k, v in self.extra.items()})
        return "\n".join(f"{k}={v}" for k, v in props.items() if v != "") + "\n"

    def __enter__(self) -> TorchServeInstance:
        self.dir = Path(tempfile.mkdtemp(prefix="ts-instance-"))
        self.store = self.dir / "model_store"
        self.tmp = self.dir / "tmp"
        self.store.mkdir()
        self.tmp.mkdir()
        for name in self.archives:
            src = self.source_store / name
            if not src.exists():
                raise FileNotFoundError(f"{src} missing: run ./archive.sh first")
            (self.store / name).symlink_to(src)
        (self.dir / "config.properties").write_text(self._config())
        self._launch()
        return self

    def _launch(self) -> None:
        # Workers import the handlers from the archive, as in production: no PYTHONPATH into the
        # working tree. TS_CONFIG_FILE (an activated venv exports it) would override --ts-config.
        inherited = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
        env = dict(inherited, TMPDIR=str(self.tmp), TEMP=str(self.tmp), TMP=str(self.tmp),
                   PATH=f"{self.python.parent}:{os.environ.get('PATH', '')}",
                   JAVA_TOOL_OPTIONS=f"-Djava.io.tmpdir={self.tmp}", **self.env)
        self.log = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            # The launcher run by `python` rather than by its shebang, which names the python it
            # was installed with (a path inside the aarch64 userland, for instance).
            [str(self.python), str(self.python.parent / "torchserve"), "--start", "--foreground", "--ncs",
             "--ts-config", str(self.dir / "config.properties"), "--model-store", str(self.store)],
            cwd=self.dir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_for_keys()
            self.client = self.make_client()
            if self.load_at_start:
                self.client.wait_ready(timeout=self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self) -> None:
        """Stops the whole server and starts it again on the same config, store and ports."""
        self.stop()
        (self.dir / "key_file.json").unlink(missing_ok=True)
        # A killed server leaves its pid file behind and `torchserve --start` would refuse.
        (self.tmp / ".model_server.pid").unlink(missing_ok=True)
        self._launch()

    def _wait_for_keys(self) -> None:
        deadline = time.monotonic() + 120
        while not key_file_written(self.dir / "key_file.json"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"TorchServe did not start:\n{self.output()}")
            time.sleep(0.2)
        time.sleep(0.5)  # the file is written before the listeners are bound

    def make_client(self, **kwargs) -> TorchServeClient:
        return TorchServeClient(
            inference_url=self.url("inference"), management_url=self.url("management"),
            metrics_url=self.url("metrics"), key_file=self.dir / "key_file.json", **kwargs,
        )

    def make_grpc_client(self, **kwargs):
        """The gRPC client (clients/grpc_api.py; the `grpc` extra) on this instance's gRPC ports."""
        from clients.grpc_api import GrpcClient

        return GrpcClient(f"127.0.0.1:{self.ports['grpc_i']}", f"127.0.0.1:{self.ports['grpc_m']}",
                          key_file=self.dir / "key_file.json", **kwargs)

    def url(self, api: str) -> str:
        return f"http://127.0.0.1:{self.ports[api]}"

    def output(self, tail: int = 4000) -> str:
        text = (self.dir / "stdout.log").read_text(errors="replace") if (self.dir / "stdout.log").exists() else ""
        return text[-tail:]

    def model_log(self) -> str:
        path = self.dir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()

    def __exit__(self, *exc) -> None:
        self.stop()
        if not os.environ.get("KEEP_TS_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)
