"""The KServe storage layout for a target, and TorchServe started exactly as KServe's runtime
starts it.

    python -m harness.kserve --profile demo --target cpu [--out DIR]    (what `make kserve` runs)

writes DIR (default outputs/kserve/<target>/):

    config/config.properties     KServe's runtime reads /mnt/models/config/config.properties
    model-store/cam.mar ddpm.mar sd15/     (hard links to model_store/ when possible)

KServe's `kserve-torchserve` ClusterServingRuntime (kserve/kserve config/runtimes/
kserve-torchserve.yaml) runs `torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties` with `TS_SERVICE_ENVELOPE` = kserve (v1) or
kservev2 (v2); TorchServe reads that variable only with `enable_envvars_config=true`. The
pytorch/torchserve-kfs image's wrapper (pytorch/serve kubernetes/kserve/kserve_wrapper) serves
KServe's port 8080 and forwards to `inference_address` (8085) and asks `management_address`
whether the workers are READY, both read from this same file, so both stay on loopback: nothing
but the wrapper in the same pod needs them. Metrics listen on 8082 for Prometheus (KServe's
runtime annotates prometheus.kserve.io/port: "8082").

`KServeTorchServe` (for tests) starts a real TorchServe from such a layout with the same
command line and environment, changing only what must differ on a shared machine: the port
numbers and the directory (see `local_config`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from harness import REPO
from harness.targets import config_path, models

MOUNT = "/mnt/models"
STORE_PATH = f"{MOUNT}/model-store"
CONFIG_PATH = f"{MOUNT}/config/config.properties"
INFERENCE_PORT = 8085   # TorchServe inference, behind the wrapper's 8080
MANAGEMENT_PORT = 8081  # loopback only: never outside the pod
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071
KSERVE_HTTP_PORT = 8080  # what KServe's wrapper (and so the InferenceService) serves
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
# KServe's runtime: args and environment of the kserve-container (kserve-torchserve.yaml).
RUNTIME_ARGS = ["torchserve", "--start", f"--model-store={STORE_PATH}", f"--ts-config={CONFIG_PATH}"]
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")


NO_ARCHIVE = {"sd15"}  # archive.sh stores these unpacked (--archive-format no-archive)


def mar_name(model: str) -> str:
    """What archive.sh writes and model_snapshot's marName names: <model>.mar, or the directory
    <model>/ for sd15. TorchServe loads a directory in the model store as an unpacked archive
    (its MAR-INF/MANIFEST.json), from a snapshot too; KServe's wrapper accepts directories and
    .mar files in the model store (kserve_wrapper/TorchserveModel.py load())."""
    return model if model in NO_ARCHIVE else f"{model}.mar"


def snapshot(target: str, names: list[str]) -> dict:
    """model_snapshot: every model with its target's batch settings (model_configs/<m>/<target>.yaml)."""
    entries = {}
    for m in names:
        cfg = yaml.safe_load(config_path(m, target).read_text())
        if cfg.get("continuousBatching"):  # ddpm's step-level path bypasses handlers/kserve.py
            print(f"harness.kserve: WARNING: {m}/{target}.yaml sets continuousBatching; KServe bodies are "
                  "translated only on the static batching path (docs/SCALING.md)", file=sys.stderr)
        entry = {"defaultVersion": True, "marName": mar_name(m)}
        for key in SNAPSHOT_KEYS:
            if key in cfg:
                entry[key] = int(cfg[key])
        entries[m] = {"1.0": entry}
    return {"name": "startup.cfg", "modelCount": len(entries), "models": entries}


def config_properties(target: str, names: list[str]) -> dict[str, str]:
    """The KServe config.properties as ordered key -> value."""
    return {
        "inference_address": f"http://127.0.0.1:{INFERENCE_PORT}",
        "management_address": f"http://127.0.0.1:{MANAGEMENT_PORT}",
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(GRPC_INFERENCE_PORT),
        "grpc_management_port": str(GRPC_MANAGEMENT_PORT),
        # TS_SERVICE_ENVELOPE (set by KServe) is read only with this on.
        "enable_envvars_config": "true",
        # Token auth off: KServe's wrapper cannot send TorchServe's token (pytorch/serve #3301).
        # Safe because management and inference listen on loopback inside the pod; the
        # InferenceService's 8080 sits behind the cluster's authentication (deploy/README.md).
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "metrics_mode": "prometheus",
        "model_store": STORE_PATH,
        "load_models": "all",
        "default_workers_per_model": "1",
        "max_request_size": "67108864",
        "max_response_size": "134217728",
        "model_snapshot": json.dumps(snapshot(target, names), separators=(",", ":")),
    }


def render(props: dict[str, str]) -> str:
    head = ("# KServe storage layout config (harness/kserve.py; `make kserve`). KServe's runtime runs\n"
            f"#   {' '.join(RUNTIME_ARGS)}\n# with TS_SERVICE_ENVELOPE=kserve (v1) or kservev2 (v2).\n")
    return head + "".join(f"{k}={v}\n" for k, v in props.items())


def parse_properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links (no copy of GBs of weights) when on the same filesystem, else copies."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=False)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def write_layout(target: str, out: Path, profile: str = "demo", store: Path | None = None,
                 names: list[str] | None = None) -> Path:
    """Writes out/config/config.properties and out/model-store/ from the archives in store."""
    store = Path(store or REPO / "model_store")
    names = names or [m for m in models() if (store / mar_name(m)).exists()]
    missing = [m for m in names if not (store / mar_name(m)).exists()]
    if missing or not names:
        raise FileNotFoundError(f"archives missing in {store}: {missing or 'all'} (run `make archive TARGET={target}`)")
    for m in names:  # the archive must be the one built for this target (archive.json inside)
        info = _archive_info(store / mar_name(m))
        if info and (info.get("target") != target or info.get("profile") != profile):
            raise ValueError(f"{store / mar_name(m)} was built for target {info.get('target')!r}, profile "
                             f"{info.get('profile')!r}; rebuild it: ./archive.sh --profile {profile} --target {target}")
    tmp = Path(tempfile.mkdtemp(prefix=".kserve-", dir=out.parent if out.parent.exists() else None))
    try:
        (tmp / "config").mkdir()
        (tmp / "model-store").mkdir()
        (tmp / "config" / "config.properties").write_text(render(config_properties(target, names)))
        for m in names:
            _link_tree(store / mar_name(m), tmp / "model-store" / mar_name(m))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _archive_info(path: Path) -> dict | None:
    import zipfile

    if path.is_dir():
        f = path / "archive.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("archive.json"))
    except (KeyError, zipfile.BadZipFile):
        return None


def local_config(props: dict[str, str], ports: dict[str, int], store: Path) -> dict[str, str]:
    """The layout's config with only the port numbers and the model store path changed."""
    out = dict(props)
    out["inference_address"] = f"http://127.0.0.1:{ports['inference']}"
    out["management_address"] = f"http://127.0.0.1:{ports['management']}"
    out["metrics_address"] = f"http://127.0.0.1:{ports['metrics']}"  # loopback on a shared machine
    out["grpc_inference_port"] = str(ports["grpc_i"])
    out["grpc_management_port"] = str(ports["grpc_m"])
    out["model_store"] = str(store)
    return out


class KServeTorchServe:
    """`with KServeTorchServe(layout, protocol="v2") as ts: requests.post(ts.url + ...)`.

    Copies the layout's config with free ports into a temp dir, then runs KServe's command line
    (`torchserve --start --model-store=... --ts-config=...`, no --foreground, no --ncs) with
    TS_SERVICE_ENVELOPE set, from that directory; waits until every model has a READY worker
    (what KServe's wrapper waits for); stops the whole process group on exit, also on failure.
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
        self.env = dict(inherited, TS_SERVICE_ENVELOPE=self.envelope, TMPDIR=str(self.tmp), TEMP=str(self.tmp),
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

    @staticmethod
    def command(store, config) -> list[str]:
        """KServe's runtime args (RUNTIME_ARGS) with this instance's two paths."""
        return ["torchserve", "--start", f"--model-store={store}", f"--ts-config={config}"]

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
        try:  # `torchserve --start` returns; the frontend stays in the process group we created
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "demo"))
    ap.add_argument("--target", default=os.environ.get("TARGET", "cpu"))
    ap.add_argument("--out", type=Path, help="default outputs/kserve/<target>")
    ap.add_argument("models", nargs="*")
    a = ap.parse_args()
    out = write_layout(a.target, a.out or REPO / "outputs" / "kserve" / a.target, a.profile, names=a.models or None)
    print(f"harness.kserve: wrote {out} (config/config.properties, model-store/: "
          f"{', '.join(sorted(p.name for p in (out / 'model-store').iterdir()))})")


if __name__ == "__main__":
    main()
