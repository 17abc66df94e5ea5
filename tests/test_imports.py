"""The package's modules import each other one way only: no import cycle, anywhere.

Every ``import`` / ``from ... import`` in every module is read from the source (module level,
inside functions and under ``if TYPE_CHECKING:`` alike), so a cycle fails here even when a
lazy import keeps it from failing at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "codebook_lens"

# Cycles that exist today and must go; nothing may be added here. The test fails as soon as one
# of them is broken, so the entry is deleted with the fix (then every cycle fails the test).
KNOWN_CYCLES: list[set[str]] = []

# The house from the top down: the command line, then what users run (the browser, the
# experiments), then the pipeline's stages in order. Every other module (config, flags, report)
# is the shared base below them all. A module may import its own floor or any floor below.
UPPER_LAYERS = (("cli",), ("app", "experiments"), ("codes",), ("training",), ("model",))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: {modules of the package it imports}}`` for every module under ``root/package``."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package a relative import is in
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from . import search` imports the submodule; `from .x import name` module x.
                targets = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files]
                if len(targets) < len(node.names):
                    targets.append(mod)
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import pkg.mod.attr` -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start = min(group)
        # Shortest way back to `start` inside the group: a breadth-first search.
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return sorted(cycles)


def test_the_package_has_no_import_cycle() -> None:
    graph = package_imports(SRC, PACKAGE)
    assert len(graph) >= 20 and f"{PACKAGE}.cli" in graph, sorted(graph)
    assert f"{PACKAGE}.training.loop" in graph[f"{PACKAGE}.training.pipeline"]  # real edges
    for stage in ("model", "training", "codes", "experiments", "app"):
        assert any(m.startswith(f"{PACKAGE}.{stage}.") for m in graph), stage
    cycles = find_cycles(graph)
    new = [c for c in cycles if set(c) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(c) for c in new)
    gone = [sorted(k) for k in KNOWN_CYCLES if k not in [set(c) for c in cycles]]
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def layer_of(module: str) -> int:
    """0 for the top (cli), ... ``len(UPPER_LAYERS)`` for the shared base."""
    first = module.removeprefix(f"{PACKAGE}.").split(".")[0]
    return next((i for i, names in enumerate(UPPER_LAYERS) if first in names), len(UPPER_LAYERS))


def test_no_module_imports_a_layer_above_its_own() -> None:
    graph = package_imports(SRC, PACKAGE)
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in sorted(graph.items())
        if mod != PACKAGE
        for dep in sorted(deps)
        if layer_of(dep) < layer_of(mod)
    ]
    assert not bad, "\n".join(bad)


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a lazy import inside a function still closes the cycle
            {"a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"},
            [["pkg.a", "pkg.b", "pkg.a"]],
        ),
        (  # `from . import c` names the submodule; absolute and parent-relative imports count
            {
                "a.py": "from . import c\n",
                "c.py": "import pkg.sub.d\n",
                "sub/__init__.py": "",
                "sub/d.py": "from ..a import x\n",
            },
            [["pkg.a", "pkg.c", "pkg.sub.d", "pkg.a"]],
        ),
        (  # one way only: no cycle
            {"a.py": "from .b import f\n", "b.py": "import os\nfrom . import c\n", "c.py": ""},
            [],
        ),
    ],
)
def test_cycle_finder(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    write(tmp_path / "pkg", {"__init__.py": "", **files})
    assert find_cycles(package_imports(tmp_path, "pkg")) == expected
