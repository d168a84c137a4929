"""Imports run one way: every import of every .py file of the project, at any depth (an import
inside a function counts; relative imports are resolved), checked against the layers below, and
no cycle between top-level packages. No exception list.

    handlers, clients            import nothing of the project outside themselves
    weights, deploy              handlers
    ui                           clients
    harness                      handlers, clients, weights, deploy
    benchmarks, lab              those and harness
    tests                        anything; nothing imports tests

Inside handlers: handlers.core imports only handlers.core, and no TorchServe (`ts`);
handlers.adapter only handlers.core; a model package handlers.<model> (any other subpackage) only
handlers.core and itself, and its entry module handlers.<model>.handler also handlers.adapter
(core < models, adapter < entry modules).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Top-level folders that are not the project's sources: git, venvs, build output (model_store/ holds
# unpacked archives, with copies of the handlers), data.
SKIP = {".git", ".arm64", "outputs", "data", "model_store", "build"}  # and .venv*, *.egg-info
LOW = {"handlers": set(), "clients": set(), "weights": {"handlers"}, "deploy": {"handlers"}, "ui": {"clients"}}
HARNESS = {"handlers", "clients", "weights", "deploy"}
MAY_IMPORT = {**LOW, "harness": HARNESS, "benchmarks": HARNESS | {"harness"}, "lab": HARNESS | {"harness"}}
MAY_IMPORT["tests"] = set(MAY_IMPORT)


def sources() -> list[Path]:
    return [p for p in sorted(REPO.rglob("*.py")) if (top := p.relative_to(REPO).parts[0]) not in SKIP
            and not top.startswith(".venv") and not top.endswith(".egg-info")]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]):
    """(line, imported module) of every import statement in the file; `from a import b` names a.b
    when that is a module of the project, else a."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base


def handlers_violation(src: str, dst: str) -> str | None:
    layer = src.split(".")[1] if "." in src else ""  # core, adapter or a model ("" = handlers/__init__)
    top, _, rest = dst.partition(".")
    if top == "ts":
        return "handlers.core must not import TorchServe (ts)" if layer == "core" else None
    if top != "handlers":
        return "handlers import nothing of the project outside handlers" if top in MAY_IMPORT else None
    if layer in ("core", "adapter"):
        allowed = {"core", layer}
    elif layer:  # a model package; its entry module joins the model to the adapter
        allowed = {"core", layer} | ({"adapter"} if src == f"handlers.{layer}.handler" else set())
    else:
        allowed = set()
    if rest.split(".")[0] in allowed:
        return None
    return f"{src} may import " + (f"only {', '.join(f'handlers.{a}' for a in sorted(allowed))}" if allowed
                                   else "nothing of handlers")


def violation(src: str, dst: str) -> str | None:
    top, dst_top = src.split(".")[0], dst.split(".")[0]
    if top == "handlers":
        return handlers_violation(src, dst)
    if dst_top in MAY_IMPORT and dst_top != top and dst_top not in MAY_IMPORT[top]:
        return f"{top} may import {sorted(MAY_IMPORT[top]) or 'nothing of the project'}"
    return None


def graph() -> tuple[list[str], dict[tuple[str, str], str]]:
    """(violations as 'file:line: ...', one example file:line per edge between top-level packages)."""
    files = sources()
    modules = {module_name(p) for p in files}
    found, edges = [], {}
    for path in files:
        src = module_name(path)
        if src.split(".")[0] not in MAY_IMPORT:
            found.append(f"{path.relative_to(REPO)}: {src.split('.')[0]} is in no layer of the import rule")
            continue
        for line, dst in imports(path, modules):
            where = f"{path.relative_to(REPO)}:{line}"
            if (why := violation(src, dst)) is not None:
                found.append(f"{where}: {src} imports {dst}: {why}")
            if dst.split(".")[0] in MAY_IMPORT and dst.split(".")[0] != src.split(".")[0]:
                edges.setdefault((src.split(".")[0], dst.split(".")[0]), where)
    return found, edges


def test_imports_run_one_way():
    found, _ = graph()
    assert not found, f"{len(found)} upward import(s):\n" + "\n".join(found)


def test_no_cycle_between_top_level_packages():
    _, edges = graph()
    cycles = set()

    def walk(path: list[str]) -> None:
        for (a, b) in edges:
            if a == path[-1] and b == path[0]:
                cycles.add(" -> ".join(f"{x} ({edges[x, y]})" for x, y in zip(path, path[1:] + path[:1])))
            elif a == path[-1] and b not in path and b > path[0]:  # each cycle once, from its smallest package
                walk(path + [b])

    for start in sorted({a for a, _ in edges}):
        walk([start])
    assert not cycles, "import cycles between packages:\n" + "\n".join(sorted(cycles))


def test_clients_import_without_torch():
    """The clients run where only `pip install .[client]` is (requests, pillow, tqdm): clients.manage
    and clients.api need none but requests, and no client module needs torch, torchvision or numpy."""
    for blocked, modules in ((("torch", "torchvision", "numpy", "PIL", "tqdm"), ("clients.manage", "clients.api")),
                             (("torch", "torchvision", "numpy"), sorted(module_name(p) for p in (REPO / "clients")
                                                                       .glob("*.py")))):
        code = (f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
                + "".join(f"import {m}\n" for m in modules))
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, f"importing {modules} without {blocked}:\n{run.stderr[-3000:]}"
