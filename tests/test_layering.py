"""Package layering: no import cycle between the packages of framework/, and pallas_kernels/
never imports framework/ (kernels stand alone; framework.ops dispatches to them)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package(module: str) -> str:
    """framework.train.loop -> framework.train; framework.errors -> framework.errors."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "framework" else parts[0]


def _imports(path: Path, module: str) -> set[str]:
    """Absolute module names imported anywhere in a file (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
                # `from framework import nn` imports the package framework.nn
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in ("framework", "pallas_kernels")}


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for top in ("framework", "pallas_kernels"):
        for path in (ROOT / top).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            src = _package(module)
            targets = {_package(m) for m in _imports(path, module)} - {src}
            edges.setdefault(src, set()).update(targets)
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    cycle = _find_cycle(_graph())
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(edges) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_pallas_kernels_never_import_framework():
    graph = _graph()
    assert "pallas_kernels" in graph and "framework.ops" in graph
    assert not any(t.startswith("framework") for t in graph["pallas_kernels"])
    assert "pallas_kernels" in graph["framework.ops"]  # the walk sees function-level imports
