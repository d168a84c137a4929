"""Models and deployment targets, discovered from model_configs/ (nothing lists them by hand).

A model is a folder `handlers/<model>/` with a `handler.py` entry module and a
`model_configs/<model>/` directory; a
target is a name T for which `model_configs/<model>/T.yaml` exists. `archive.sh` uses the same
rule (and the same `MODEL_CONFIGS` override), so a test that loops over `targets()` covers
whatever `archive.sh --target` accepts.
"""
from __future__ import annotations

import os
from pathlib import Path

from deploy import REPO


def configs_dir() -> Path:
    """`$MODEL_CONFIGS` when set (as archive.sh reads it), else the repo's model_configs/."""
    return Path(os.environ.get("MODEL_CONFIGS") or REPO / "model_configs")


def models(configs: Path | None = None) -> list[str]:
    """Models with a handler and a model-config directory, sorted."""
    configs = Path(configs or configs_dir())
    return sorted(p.parent.name for p in (REPO / "handlers").glob("*/handler.py")
                  if (configs / p.parent.name).is_dir())


def targets(model: str | None = None, configs: Path | None = None) -> list[str]:
    """Targets of `model`, or (model=None) the targets every model has, sorted: what
    `archive.sh --target` accepts when building that model / all of them."""
    configs = Path(configs or configs_dir())
    names = [model] if model else models(configs)
    if model and not (configs / model).is_dir():
        raise ValueError(f"unknown model {model!r} (known: {', '.join(models(configs))})")
    found = None
    for m in names:
        mine = {p.stem for p in (configs / m).glob("*.yaml") if p.is_file()}
        found = mine if found is None else found & mine
    return sorted(found or ())


def config_path(model: str, target: str, configs: Path | None = None) -> Path:
    """model_configs/<model>/<target>.yaml; ValueError naming the known targets if missing."""
    path = Path(configs or configs_dir()) / model / f"{target}.yaml"
    if not path.is_file():
        raise ValueError(f"no target {target!r} for {model} (available: {', '.join(targets(model, configs))})")
    return path
