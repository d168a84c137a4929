"""TorchServe started exactly as KServe's runtime starts it, from a storage layout written by
deploy/kserve_layout.py (`make kserve`), for the tests.

`KServeTorchServe` runs the project's KServe runtime's command line and environment
(deploy.kserve_layout.RUNTIME_ARGS, RUNTIME_ENV), changing only what must differ on a shared
machine: the port numbers, the directory (see `local_config`) and the inference address, on
loopback instead of the pod's 0.0.0.0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from deploy.kserve_layout import ENVELOPES, parse_properties, render


def local_config(props: dict[str, str], ports: dict[str, int], store: Path) -> dict[str, str]:
    """The layout's config with only the port numbers and the model store path changed. The
    inference address is left as it is: TS_INFERENCE_ADDRESS moves it, as in the pod."""
    out = dict(props)
    out["management_address"] = f"http://127.0.0.1:{ports['management']}"
    out["metrics_address"] = f"http://127.0.0.1:{ports['metrics']}"  # loopback on a shared machine
    out["grpc_inference_port"] = str(ports["grpc_i"])
    out["grpc_management_port"] = str(ports["grpc_m"])
    out["model_store"] = str(store)
    return out


class KServeTorchServe:
    """`with KServeTorchServe(layout, protocol="v2") as ts: requests.post(ts.url + ...)`.

    Copies the layout's config with free ports into a temp dir, then runs the runtime's command
    line (`torchserve --start --foreground --ncs --model-store=... --ts-config=...`) with
    TS_SERVICE_ENVELOPE and TS_INFERENCE_ADDRESS set, from that directory; waits until every
    model has a READY worker (what the runtime's readiness probe, /ping, waits for); stops the
    whole process group on exit, also on failure.
    """

    def __init__(self, layout: Path, protocol: str, overrides: dict[str, dict] | None = None,
                 env: dict | None = None, startup_timeout: float = 300):
        from harness.torchserve import free_port

        self.layout = Path(layout).resolve()
        self.protocol = protocol
        self.envelope = ENVELOPES[protocol]
        self.overrides = overrides or {}  # model -> snapshot values to change (tests: maxBatchDelay)
        self.extra_env = env or {}
        self.startup_timeout = startup_timeout
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_i", "grpc_m")}
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.proc = None

    def __enter__(self):
        from harness.torchserve import VENV_BIN

        self.dir = Path(tempfile.mkdtemp(prefix="ts-kserve-"))
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir()
        store = self.layout / "model-store"
        props = local_config(parse_properties((self.layout / "config" / "config.properties").read_text()),
                             self.ports, store)
        if self.overrides:
            snap = json.loads(props["model_snapshot"])
            for model, values in self.overrides.items():
                for version in snap["models"][model].values():
                    version.update(values)
            props["model_snapshot"] = json.dumps(snap, separators=(",", ":"))
        (self.dir / "config").mkdir()
        self.config = self.dir / "config" / "config.properties"
        self.config.write_text(render(props))
        self.models = list(json.loads(props["model_snapshot"])["models"])
        self.args = self.command(store, self.config)
        inherited = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
        self.env = dict(inherited, **self.runtime_env(), TMPDIR=str(self.tmp), TEMP=str(self.tmp),
                        TMP=str(self.tmp), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                        JAVA_TOOL_OPTIONS=f"-Djava.io.tmpdir={self.tmp}", **self.extra_env)
        self.log = open(self.dir / "stdout.log", "ab")
        try:
            self.proc = subprocess.Popen(self.args, cwd=self.dir, env=self.env, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def runtime_env(self) -> dict[str, str]:
        """The runtime's environment (RUNTIME_ENV) for this instance: the envelope KServe's label
        gives this protocol, inference on this instance's loopback port."""
        return {"TS_SERVICE_ENVELOPE": self.envelope, "TS_INFERENCE_ADDRESS": self.url}

    @staticmethod
    def command(store, config) -> list[str]:
        """The runtime's args (RUNTIME_ARGS) with this instance's two paths."""
        return ["torchserve", "--start", "--foreground", "--ncs", f"--model-store={store}", f"--ts-config={config}"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = set(self.models)
        while pending:
            for m in list(pending):
                try:
                    r = requests.get(f"{self.management}/models/{m}", timeout=5)
                    if r.ok and any(w.get("status") == "READY" for w in r.json()[0].get("workers", [])):
                        pending.discard(m)
                except (requests.RequestException, ValueError, IndexError):
                    pass
            if self.proc.poll() not in (None, 0):
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}\n{self.output()}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not READY: {sorted(pending)}\n{self.output()}")
            if pending:
                time.sleep(1)

    def output(self, tail: int = 4000) -> str:
        text = ""
        for name in ("stdout.log", "logs/ts_log.log", "logs/model_log.log"):
            p = self.dir / name
            if p.exists():
                text += f"--- {name}\n" + p.read_text(errors="replace")[-tail:]
        return text

    def stop(self) -> None:
        if self.proc is None:
            return
        try:  # the launcher and the frontend (and its workers) share the process group we created
            os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the launcher, or the group never looks empty
                os.killpg(self.proc.pid, 0)
                time.sleep(0.3)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.stop()
        if not os.environ.get("KEEP_TS_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)
