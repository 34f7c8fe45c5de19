"""The package is layered: every import points down (or sideways within a package), none up,
and no two modules import each other in a circle. Core is pure torch: it never imports Flower.
The strategies (what a Flower user imports) depend only on the protocol and the core."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: lowest first; a module may import its own layer or any below
LAYERS: list[tuple[str, ...]] = [
    ("collafuse_flwr.imports", "collafuse_flwr.core"),
    ("collafuse_flwr.config", "collafuse_flwr.protocol", "collafuse_flwr.comm"),
    ("collafuse_flwr.data",),
    ("collafuse_flwr.metrics",),
    ("collafuse_flwr.node", "strategies"),
    ("collafuse_flwr.harness",),
    ("collafuse_flwr.server", "collafuse_flwr.server_app", "collafuse_flwr.client_app"),
    ("collafuse_flwr.tools",),
]
#: what the strategies may import from this project (plus Flower, torch, numpy)
STRATEGY_DEPENDENCIES = ("collafuse_flwr.protocol", "collafuse_flwr.comm", "collafuse_flwr.core",
                         "collafuse_flwr.imports", "strategies")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of the tree, nested ones included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(n) for w in tree.body if isinstance(w, (ast.With, ast.Try, ast.If))
                                        for n in ast.walk(w)}
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base, id(node) in top)
                    for a in node.names]
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


SOURCES = {_module(p): p for d in ("collafuse_flwr", "strategies") for p in (ROOT / d).rglob("*.py")}
OURS = ("collafuse_flwr", "strategies")


def _edges(module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in SOURCES.items():
        graph[mod] = {name for name, top in _imports(path, mod)
                      if name.split(".")[0] in OURS and name in SOURCES and name != mod
                      and (top or not module_level_only)}
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if _layer(b) > _layer(a))


def test_no_import_points_up():
    up = _upward(_edges())
    assert not up, "upward imports:\n" + "\n".join(up)


def test_no_circle_of_module_imports():
    graph = _edges(module_level_only=True)
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == m.rpartition(".")[0]:  # a module's own package, imported for a sibling
                continue
            if seen.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in seen and (cycle := visit(n)):
                return cycle
        stack.pop()
        seen[m] = 2
        return None

    for m in sorted(graph):
        if m not in seen and (cycle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_core_never_imports_flower_and_strategies_only_protocol_and_core():
    bad = []
    for mod, path in SOURCES.items():
        names = [n for n, _ in _imports(path, mod)]
        if mod.startswith("collafuse_flwr.core"):
            bad += [f"{mod} -> {n}" for n in names if n.split(".")[0] in ("flwr", "flwr_datasets")]
        if mod.startswith("strategies"):
            bad += [f"{mod} -> {n}" for n in names
                    if n.split(".")[0] in OURS and not n.startswith(STRATEGY_DEPENDENCIES)]
    assert not bad, "\n".join(sorted(bad))


def test_the_checks_can_fail():
    """The parser sees real imports, and an import from the core into an app is flagged."""
    graph = _edges()
    assert "collafuse_flwr.core.diffusion" in graph["collafuse_flwr.client_app"]
    assert _upward({"collafuse_flwr.core.training": {"collafuse_flwr.server_app"}})
    assert _upward({"strategies.collafuse": {"collafuse_flwr.harness.report"}})
