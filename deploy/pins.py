"""pyproject.toml's requirements as a requirements file, for installs that take the pins but not
the project: the aarch64 userland's venv (harness/arm64_userland.sh) and the images (deploy/Dockerfile*).

    python3 deploy/pins.py [--pyproject FILE] EXTRA...    the base dependencies, then each extra's, one a line

Markers are kept: pip evaluates them on the machine it installs on. Standard library only
(python >= 3.11), so it also runs outside the project's venv.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra {', '.join(unknown)} (known: {', '.join(optional)})")
    lines = list(project["dependencies"])
    for extra in extras:
        lines += [r for r in optional[extra] if r not in lines]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/pins.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("extras", nargs="*")
    args = parser.parse_args(argv)
    print("\n".join(pins(args.pyproject, args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
