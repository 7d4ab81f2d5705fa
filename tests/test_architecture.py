"""The package's shape: no import cycle, no oversized class, no behaviour chosen by comparing names.

These read the source (the ``ast``), so they hold for every code path, also the ones no run takes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spirt"
MAX_CLASS_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all of them but the bodies of ``if TYPE_CHECKING:`` (read by type
    checkers only, never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, wherever in the module the import statement is
    (a function-level import closes a cycle just as well, only later)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["spirt.peer"], "the import graph is empty: the scan is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_for_type_checkers_only_are_not_edges():
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\ndef f():\n    import z\n"
    found = {a.name for n in _runtime_nodes(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    assert found == {"y", "z"}


def test_no_class_over_400_lines():
    big = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "attacks").glob("*.py"), *(ROOT / "defenses").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                           f"({node.end_lineno - node.lineno + 1} lines)")
    assert not big, big


def _registered_names() -> set[str]:
    import defenses
    from spirt import backends, executors

    return {*backends.names(), *executors.names(), *defenses.names()}


#: what the compared variable is called when it holds a backend, executor or defense name
CHOOSERS = ("backend", "executor", "defense", "kind", "name")


def _name_comparisons(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing a backend, executor or defense (a variable or attribute named like one) with a
    registered name: ``backend.name == "module"``, ``kind in ("process", ...)``. Rows of result tables
    (``df["backend"] == "client"``) are data, not choices, and are not counted."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        chooser = any(isinstance(o, (ast.Name, ast.Attribute)) and any(w in ast.unparse(o).lower() for w in CHOOSERS)
                      for o in operands)
        for operand in operands:
            consts = [operand] if isinstance(operand, ast.Constant) else (
                list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [])
            if chooser and any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                lines.append(node.lineno)
    return lines


def test_no_behaviour_chosen_by_comparing_names():
    """Backends, executors and defenses are chosen by what they declare they can do, not by name."""
    names = _registered_names()
    found = []
    for path in PACKAGE.rglob("*.py"):
        for line in _name_comparisons(ast.parse(path.read_text()), names):
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, found


@pytest.mark.parametrize("src, hits", [
    ('if backend.name == "module": pass', 1),
    ('if kind in ("process", "ray"): pass', 1),
    ('if defense in ["mean", "average"]: pass', 1),
    ('if backend.in_database: pass', 0),
    ('if op == "mean": pass', 0),
    ('rows = df[df["backend"] == "client"]', 0),
])
def test_the_name_comparison_scan_sees_them(src, hits):
    assert len(_name_comparisons(ast.parse(src), _registered_names() | {"average"})) == hits
