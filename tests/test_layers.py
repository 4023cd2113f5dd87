"""The one-way house: every module imports only its own layer or lower, and no modules import in a circle.

Imports are read with ``ast`` (module level and inside functions alike), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "xmcl"

# Layer of each top-level module or subpackage of xmcl, bottom (0) to top.
LAYERS = {
    "errors": 0, "config": 0,
    "runtime": 1,
    "nn": 2, "data": 2, "contrast": 2, "metrics": 2,
    "retrieval": 3, "distill": 3,
    "training": 4,
    "cli": 5, "demo": 5, "__main__": 5, "serve": 5, "__init__": 0,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``xmcl`` module that ``path`` imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "xmcl")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "xmcl":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: its top-level part {top!r} has no layer; add it to LAYERS")
    return LAYERS[top]


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_go_down_the_layers(module: str) -> None:
    upward = [target for target in _graph()[module] if _layer(target) > _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_cycles() -> None:
    graph = _graph()
    # Packages import their own modules in __init__; an edge package -> its submodule is not a cycle back.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    """The walker sees an import inside a function (the form a lazy upward import takes)."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from xmcl.training.run import RunFolder\n    import xmcl.cli\n")
    assert {"xmcl.training.run", "xmcl.training.run.RunFolder", "xmcl.cli"} <= _imports(planted)


def test_no_module_outside_training_imports_a_trainer() -> None:
    trainers = {m for m in _graph() if m.startswith("xmcl.training.") and m.endswith("_trainer")}
    for module, targets in _graph().items():
        if module.startswith(("xmcl.training", "xmcl.cli", "xmcl.demo")):
            continue
        assert not targets & trainers, f"{module} imports a trainer: {targets & trainers}"
