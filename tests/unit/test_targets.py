"""Targets are discovered from model_configs/<model>/<target>.yaml; archive.sh lists none by hand."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from deploy.targets import REPO, config_path, models, targets


def archive(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MODEL_CONFIGS", "TARGET")}
    full_env.update(env or {})
    return subprocess.run([str(REPO / "archive.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def configs_with(tmp_path: Path, target: str, for_models: list[str]) -> Path:
    """A copy of model_configs/ with `target` added (a copy of cpu.yaml) for `for_models`."""
    configs = tmp_path / "model_configs"
    shutil.copytree(REPO / "model_configs", configs)
    for m in for_models:
        text = (configs / m / "cpu.yaml").read_text()
        (configs / m / f"{target}.yaml").write_text(f"# {target}: test target\n{text}")
    return configs


def test_discovered_from_model_configs():
    assert models() == sorted(p.name for p in (REPO / "model_configs").iterdir()
                              if p.is_dir() and (REPO / "handlers" / p.name / "handler.py").exists())
    for m in models():
        assert targets(m) == sorted(p.stem for p in (REPO / "model_configs" / m).glob("*.yaml"))
        assert "cpu" in targets(m)  # archive.sh's default
    assert set(targets()) == set.intersection(*(set(targets(m)) for m in models()))


def test_targets_follow_the_config_files(tmp_path):
    configs = configs_with(tmp_path, "jetson", ["ddpm"])
    assert "jetson" in targets("ddpm", configs)
    assert "jetson" not in targets(None, configs)  # not every model has it
    assert config_path("ddpm", "jetson", configs).name == "jetson.yaml"
    with pytest.raises(ValueError, match="available: .*cpu"):
        config_path("cam", "jetson", configs)


def test_unknown_target_one_line_naming_the_known_ones(tmp_path):
    r = archive("--target", "nonexistent", "--store", str(tmp_path), *models())
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown target 'nonexistent'" in lines[0]
    assert f"(available: {' '.join(targets())};" in lines[0], lines[0]
    assert not list(tmp_path.iterdir())


def test_target_must_exist_for_every_model_built(tmp_path):
    configs = configs_with(tmp_path, "jetson", ["ddpm"])
    r = archive("--target", "jetson", "--store", str(tmp_path / "store"), "ddpm", "cam",
                env={"MODEL_CONFIGS": str(configs)})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"(available: {' '.join(targets())};" in r.stderr


def test_new_target_needs_only_its_config_files(tmp_path):
    """Adding model_configs/<model>/jetson.yaml is all `archive.sh --target jetson` needs."""
    configs = configs_with(tmp_path, "jetson", models())
    store = tmp_path / "store"
    # ddpm: its demo weights are committed, so this runs on a fresh clone in a few seconds.
    r = archive("--target", "jetson", "--store", str(store), "ddpm",
                env={"MODEL_CONFIGS": str(configs)})
    assert r.returncode == 0, r.stderr + r.stdout
    assert "target jetson" in r.stdout
    with zipfile.ZipFile(store / "ddpm.mar") as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["configFile"] == "jetson.yaml"
        assert z.read("jetson.yaml").decode() == (configs / "ddpm" / "jetson.yaml").read_text()
    # The repo's own model_configs/ has no such target: refused, naming the ones it has.
    r = archive("--target", "jetson", "--store", str(tmp_path / "store2"), "ddpm")
    assert r.returncode == 1 and "unknown target 'jetson'" in r.stderr


def test_makefile_help_lists_the_discovered_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert f"[TARGET={'|'.join(sorted(set().union(*(targets(m) for m in models()))))}]" in out


def test_an_archive_packs_the_core_and_its_own_model_only(tmp_path):
    """cam's archive holds handlers/core, handlers/adapter and handlers/cam, so editing another
    model never rebuilds it; sd15's format comes from its config. Run on a copy of the tree."""
    tree = tmp_path / "tree"
    for part in ("handlers", "model_configs"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "weights").mkdir()
    for module in (REPO / "weights").glob("*.py"):  # archive.sh hashes the weights with weights/sha256.py
        shutil.copy(module, tree / "weights")
    shutil.copy(REPO / "archive.sh", tree)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
           "CAM_WEIGHTS": str(REPO / "weights/demo/cam"), "SD15_WEIGHTS": str(REPO / "weights/demo/sd15")}

    def build(*models):
        return subprocess.run([str(tree / "archive.sh"), "--store", str(tmp_path / "store"), *models], env=env,
                              capture_output=True, text=True, timeout=300, check=True)

    build("cam", "sd15")
    with zipfile.ZipFile(tmp_path / "store" / "cam.mar") as z:
        packages = {Path(n).parts[1] for n in z.namelist() if n.startswith("handlers/") and n.count("/") > 1}
    assert packages == {"core", "adapter", "cam"}
    assert (tmp_path / "store" / "sd15" / "MAR-INF").is_dir()  # archive_format: no-archive in its configs
    with open(tree / "handlers" / "sd15" / "model.py", "a") as f:
        f.write("\n# an edit of another model\n")
    assert "cam is up to date" in build("cam").stdout
    with open(tree / "handlers" / "core" / "errors.py", "a") as f:
        f.write("\n# an edit of the core\n")
    assert "wrote" in build("cam").stdout


def test_a_failed_weights_copy_leaves_the_store_as_it_was(tmp_path):
    """sd15's weights are copied in the background while they are hashed and archived: a copy that
    fails (a dangling symlink) stops the build with one line, and the store keeps its archive."""
    store = tmp_path / "store"
    assert archive("--store", str(store), "sd15").returncode == 0
    before = sorted(p.name for p in (store / "sd15" / "weights").iterdir())
    weights = tmp_path / "weights"
    shutil.copytree(REPO / "weights/demo/sd15", weights)
    (weights / "missing.bin").symlink_to(tmp_path / "nowhere")
    run = archive("--force", "--store", str(store), "--weights", str(weights), "sd15")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "archive.sh: copying the weights of sd15 failed"
    assert sorted(p.name for p in (store / "sd15" / "weights").iterdir()) == before
    assert not [p for p in store.iterdir() if p.name.startswith(".build-")]
