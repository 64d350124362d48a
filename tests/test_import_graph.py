"""The first-party packages import each other without cycles.

Every import counts, at module level or inside a function alike: a lazy import only hides a
cycle from the interpreter, not from the design. The graph is read from the source with
`ast`, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES = sorted({name.split(".")[0] for name in SETUPTOOLS["packages"]} - {"mage_data"})


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    assert parts[0] == package, path
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` in a/b/mod.py (or a/b/__init__.py) is a.b
                base = parts[: len(parts) - node.level]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
    return names


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> {imported first-party package -> the files that import it}."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in imported_modules(path, package):
                target = module.split(".")[0]
                if target in graph and target != package:
                    where = str(path.relative_to(ROOT))
                    graph[package].setdefault(target, []).append(where)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" once fully explored
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for succ in sorted(edges.get(node, ())):
            if state.get(succ) == "open":
                return [*stack[stack.index(succ) :], succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    hops = [
        f"{a} -> {b} ({', '.join(sorted(set(graph[a][b])))})"
        for a, b in zip(cycle, cycle[1:], strict=False)
    ]
    return "package import cycle " + " -> ".join(cycle) + ":\n  " + "\n  ".join(hops)


def test_find_cycle_finds_one_and_only_one_that_is_there():
    # The checker itself: a test that cannot fail proves nothing.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]


def test_the_graph_reads_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "import os\nfrom . import sibling\nfrom ..top import x\n"
        "def f():\n    from other.deep import y\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = imported_modules(pkg / "mod.py", "pkg")
    assert found == {"os", "pkg.sub", "pkg.top", "other.deep"}


def test_first_party_packages_import_each_other_without_cycles():
    expected = {"cli", "evaluation", "guidance", "merging", "model_store", "objectives"}
    assert expected | {"server", "training"} <= set(PACKAGES)
    graph = package_graph()
    cycle = find_cycle({a: set(b) for a, b in graph.items()})
    assert cycle is None, describe(cycle, graph)


def test_merging_is_tensor_functions_and_a_registry():
    # merging/ is the bottom layer: coefficient maths and exact LoRA merges on tensors.
    assert package_graph()["merging"] == {}
