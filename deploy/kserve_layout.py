"""The KServe storage layout for a target.

    python -m deploy.kserve_layout --profile demo --target cpu [--out DIR]    (what `make kserve` runs)

writes DIR (default outputs/kserve/<target>/):

    config/config.properties     KServe's runtime reads /mnt/models/config/config.properties
    model-store/cam.mar ddpm.mar sd15/     (hard links to model_store/ when possible)

The project's own ClusterServingRuntime (deploy/kserve/servingruntime.yaml, RUNTIME_NAME) runs
the project's image with RUNTIME_ARGS (`torchserve --start --foreground --ncs
--model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`) and
RUNTIME_ENV: `TS_SERVICE_ENVELOPE` = kserve (v1) or kservev2 (v2), which TorchServe 0.12's own
frontend serves, and `TS_INFERENCE_ADDRESS`, which moves inference from this file's loopback
8085 to the pod's 8080, where KServe sends requests. TorchServe reads both variables only with
`enable_envvars_config=true`. KServe's retired `kserve-torchserve` runtime ran the same command
line without those two flags and put its own wrapper on 8080 in front of 8085; the layout still
serves it unchanged. Management stays on loopback (nothing outside the pod needs it). Metrics
listen on 8082 for Prometheus (the runtime annotates prometheus.kserve.io/port: "8082").

harness/kserve.py (tests) starts a real TorchServe from such a layout with the same command
line and environment.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from deploy import REPO
from deploy.targets import config_path, models

MOUNT = "/mnt/models"
STORE_PATH = f"{MOUNT}/model-store"
CONFIG_PATH = f"{MOUNT}/config/config.properties"
INFERENCE_PORT = 8085   # TorchServe inference in this file; the runtime moves it (RUNTIME_ENV)
MANAGEMENT_PORT = 8081  # loopback only: never outside the pod
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071
KSERVE_HTTP_PORT = 8080  # where KServe sends an InferenceService's requests in the pod
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
# The project's runtime (deploy/kserve/servingruntime.yaml): the kserve-container's args and
# environment. TS_SERVICE_ENVELOPE comes from the InferenceService's protocolVersion
# (ENVELOPES), through KServe's serviceEnvelope label.
RUNTIME_NAME = "torchserve-models"
RUNTIME_ARGS = ["torchserve", "--start", "--foreground", "--ncs", f"--model-store={STORE_PATH}",
                f"--ts-config={CONFIG_PATH}"]
RUNTIME_ENV = {"TS_SERVICE_ENVELOPE": "{{.Labels.serviceEnvelope}}",
               "TS_INFERENCE_ADDRESS": f"http://0.0.0.0:{KSERVE_HTTP_PORT}"}
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")


def mar_name(model: str, target: str) -> str:
    """What archive.sh writes and model_snapshot's marName names: <model>.mar, or the directory
    <model>/ when the model's config says `archive_format: no-archive` (sd15). TorchServe loads a directory in the model store as an unpacked archive
    (its MAR-INF/MANIFEST.json), from a snapshot too."""
    cfg = yaml.safe_load(config_path(model, target).read_text())
    return model if cfg.get("archive_format") == "no-archive" else f"{model}.mar"


def snapshot(target: str, names: list[str]) -> dict:
    """model_snapshot: every model with its target's batch settings (model_configs/<m>/<target>.yaml)."""
    entries = {}
    for m in names:
        cfg = yaml.safe_load(config_path(m, target).read_text())
        entry = {"defaultVersion": True, "marName": mar_name(m, target)}
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
        # Token auth off: TorchServe makes new keys in every pod at start (key_file.json), which
        # no client, probe or KServe component outside the pod can know (pytorch/serve #3301).
        # Management stays on loopback inside the pod; the InferenceService's 8080 sits behind
        # the cluster's authentication (docs/kserve.md).
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
    head = ("# KServe storage layout config (deploy/kserve_layout.py; `make kserve`). KServe's runtime runs\n"
            f"#   {' '.join(RUNTIME_ARGS)}\n# with TS_SERVICE_ENVELOPE=kserve (v1) or kservev2 (v2) and "
            f"TS_INFERENCE_ADDRESS={RUNTIME_ENV['TS_INFERENCE_ADDRESS']}.\n")
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
    names = names or [m for m in models() if (store / mar_name(m, target)).exists()]
    missing = [m for m in names if not (store / mar_name(m, target)).exists()]
    if missing or not names:
        raise FileNotFoundError(f"archives missing in {store}: {missing or 'all'} (run `make archive TARGET={target}`)")
    for m in names:  # the archive must be the one built for this target (archive.json inside)
        info = _archive_info(store / mar_name(m, target))
        if info and (info.get("target") != target or info.get("profile") != profile):
            raise ValueError(f"{store / mar_name(m, target)} was built for target {info.get('target')!r}, profile "
                             f"{info.get('profile')!r}; rebuild it: ./archive.sh --profile {profile} --target {target}")
    tmp = Path(tempfile.mkdtemp(prefix=".kserve-", dir=out.parent if out.parent.exists() else None))
    try:
        (tmp / "config").mkdir()
        (tmp / "model-store").mkdir()
        (tmp / "config" / "config.properties").write_text(render(config_properties(target, names)))
        for m in names:
            _link_tree(store / mar_name(m, target), tmp / "model-store" / mar_name(m, target))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "demo"))
    ap.add_argument("--target", default=os.environ.get("TARGET", "cpu"))
    ap.add_argument("--out", type=Path, help="default outputs/kserve/<target>")
    ap.add_argument("models", nargs="*")
    a = ap.parse_args()
    out = write_layout(a.target, a.out or REPO / "outputs" / "kserve" / a.target, a.profile, names=a.models or None)
    print(f"deploy.kserve_layout: wrote {out} (config/config.properties, model-store/: "
          f"{', '.join(sorted(p.name for p in (out / 'model-store').iterdir()))})")


if __name__ == "__main__":
    main()
