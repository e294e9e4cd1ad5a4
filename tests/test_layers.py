"""Imports only point down, and no module imports itself back (docs/architecture.md, "Layers").

Every module under ``src/sparsealign`` is parsed with :mod:`ast`; every ``import x`` and ``from x import y``
counts, at module level or inside a function, except those under ``if TYPE_CHECKING:``, which run only in a
type checker: they still must not point up, but they cannot close a cycle at run time.

Layers, low to high (a module may import its own layer and lower ones, never a higher one):

0. ``errors``, ``io``, ``hub``, ``version``, ``plugins`` (importing a user's ``file.py:name``): helpers;
1. ``config``;
2. components: ``data``, ``models``, ``losses``, ``masks``, ``sae``, ``rewards``, ``refcache`` (they may
   import one another, as long as no cycle forms);
3. ``methods``;
4. ``recipes``;
5. ``train`` (the step components, then the loop);
6. ``sample``, ``eval``;
7. ``cli``, ``api`` and the package's ``__init__`` (the Python API).

An import ``from sparsealign.a import b`` is an edge to the module ``sparsealign.a.b`` when that is a
module, else to ``sparsealign.a``. Parent packages that Python initialises on the way are not edges.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import sparsealign

PACKAGE = "sparsealign"
SOURCE = Path(sparsealign.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "errors": 0,
    "io": 0,
    "hub": 0,
    "plugins": 0,
    "version": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "losses": 2,
    "masks": 2,
    "sae": 2,
    "rewards": 2,
    "refcache": 2,
    "methods": 3,
    "recipes": 4,
    "train": 5,
    "sample": 6,
    "eval": 6,
    "cli": 7,
    "api": 7,
    "__main__": 7,
}
TOP = max(LAYERS.values())


@dataclass(frozen=True, order=True)
class Import:
    """One import statement's edge: ``source`` imports ``target`` at ``file:line``."""

    source: str
    target: str
    file: str
    line: int
    type_only: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def all_packages() -> set[str]:
    """Every folder of the package (a folder without ``__init__.py`` is still importable, as a namespace)."""
    folders = [SOURCE, *(p for p in SOURCE.rglob("*") if p.is_dir() and p.name != "__pycache__")]
    return {module_name(folder / "__init__.py") for folder in folders}


def layer(module: str) -> int | None:
    """The layer of a module of the package (``sparsealign`` itself is the top); None when unassigned."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return TOP
    return LAYERS.get(parts[1])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST, type_only: bool = False):
    """``(node, type_only)`` for every import statement in ``tree``, however deeply nested."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _statements(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _statements(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _statements(node, type_only)


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """The sparsealign modules that ``module`` imports, one :class:`Import` per imported module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    file = path.relative_to(SOURCE.parent).as_posix()
    found: list[Import] = []
    for node, type_only in _statements(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.append(child if child in modules else base)
        for target in targets:
            if (target == PACKAGE or target.startswith(PACKAGE + ".")) and target != module:
                found.append(Import(module, target, file, node.lineno, type_only))
    return sorted(set(found))


def import_graph() -> list[Import]:
    modules = all_modules()
    known = set(modules) | all_packages()
    return [edge for module, path in modules.items() for edge in imports_of(module, path, known)]


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """The import cycles, one list per strongly connected component of more than one module (Tarjan): every
    import between two modules of the component, each of which lies on a cycle (its target reaches back to
    its source), so cutting the cycle means removing some of exactly these imports."""
    graph: dict[str, list[Import]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = [sorted(e for e in edges if e.source in c and e.target in c) for c in components]
    return sorted(cycles, key=lambda c: (c[0].source, c[0].target))


# --------------------------------------------------------------------------------------------------
# The rules.


def test_every_module_has_a_layer():
    unassigned = sorted(m for m in all_modules() if layer(m) is None)
    assert not unassigned, f"Give these modules a layer in tests/test_layers.py LAYERS: {unassigned}"


def test_imports_only_point_down():
    upward = [
        edge
        for edge in import_graph()
        if None not in (layer(edge.source), layer(edge.target)) and layer(edge.target) > layer(edge.source)
    ]
    lines = [f"{edge} (layer {layer(edge.source)} -> {layer(edge.target)})" for edge in upward]
    assert not upward, "Imports from a higher layer:\n" + "\n".join(lines)


def shortest_cycle(component: list[Import]) -> list[str]:
    """The modules of a shortest cycle through the component's first module (breadth-first)."""
    start = component[0].source
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in component:
                if edge.source != node:
                    continue
                if edge.target == start:
                    path = [node]
                    while path[0] != start:
                        path.insert(0, came_from[path[0]])
                    return [*path, start]
                if edge.target not in came_from:
                    came_from[edge.target] = node
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # every module of a component lies on one


def test_no_import_cycles():
    cycles = find_cycles([edge for edge in import_graph() if not edge.type_only])
    lines = [
        " -> ".join(shortest_cycle(c)) + "; the imports on a cycle there:" + "".join(f"\n    {e}" for e in c)
        for c in cycles
    ]
    assert not cycles, "Import cycles (module-level or inside functions):\n" + "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The checker itself, on hand-made modules.


def _graph_of(sources: dict[str, str], tmp_path: Path, monkeypatch) -> list[Import]:
    root = tmp_path / PACKAGE
    for name, text in sources.items():
        file = root / Path(*name.split(".")).with_suffix(".py")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    monkeypatch.setattr(f"{__name__}.SOURCE", root)
    return import_graph()


def test_checker_reads_every_kind_of_import(tmp_path, monkeypatch):
    edges = _graph_of(
        {
            "__init__": "",
            "errors": "",
            "config": "from sparsealign.errors import UserError\n",
            "models.__init__": "",
            "models.loading": (
                "from typing import TYPE_CHECKING\n"
                "from . import dtype\n"
                "from .dtype import resolve\n"
                "if TYPE_CHECKING:\n"
                "    from sparsealign.train import loop\n"
                "def f():\n"
                "    import sparsealign.config\n"
                "    from sparsealign.models import dtype as d\n"
            ),
            "models.dtype": "import sparsealign.errors as e\n",
            "train.__init__": "",
            "train.loop": "from sparsealign.models import loading\n",
        },
        tmp_path,
        monkeypatch,
    )
    found = {(e.source, e.target, e.line, e.type_only) for e in edges}
    assert found == {
        ("sparsealign.config", "sparsealign.errors", 1, False),
        ("sparsealign.models.loading", "sparsealign.models.dtype", 2, False),
        ("sparsealign.models.loading", "sparsealign.models.dtype", 3, False),
        ("sparsealign.models.loading", "sparsealign.train.loop", 5, True),
        ("sparsealign.models.loading", "sparsealign.config", 7, False),
        ("sparsealign.models.loading", "sparsealign.models.dtype", 8, False),
        ("sparsealign.models.dtype", "sparsealign.errors", 1, False),
        ("sparsealign.train.loop", "sparsealign.models.loading", 1, False),
    }
    upward = [e for e in edges if layer(e.target) > layer(e.source)]
    assert [(e.source, e.target) for e in upward] == [
        ("sparsealign.models.loading", "sparsealign.train.loop")
    ]
    assert find_cycles([e for e in edges if not e.type_only]) == []
    cycles = find_cycles(edges)  # counting the type-only import, loading -> loop -> loading is a cycle
    assert [[(e.source, e.target) for e in c] for c in cycles] == [
        [
            ("sparsealign.models.loading", "sparsealign.train.loop"),
            ("sparsealign.train.loop", "sparsealign.models.loading"),
        ]
    ]


def test_checker_finds_lazy_cycles(tmp_path, monkeypatch):
    edges = _graph_of(
        {
            "__init__": "",
            "sae.__init__": "",
            "sae.a": "from sparsealign.sae.b import x\n",
            "sae.b": "def f():\n    from sparsealign.sae import c\n    from sparsealign.sae import a\n",
            "sae.c": "def g():\n    from sparsealign.sae.a import y\n",
            "sae.d": "import sparsealign.sae.a\n",
        },
        tmp_path,
        monkeypatch,
    )
    cycles = find_cycles(edges)
    assert [shortest_cycle(c) for c in cycles] == [
        ["sparsealign.sae.a", "sparsealign.sae.b", "sparsealign.sae.a"]
    ]
    assert [[str(e) for e in c] for c in cycles] == [
        [
            "sparsealign/sae/a.py:1: sparsealign.sae.a imports sparsealign.sae.b",
            "sparsealign/sae/b.py:3: sparsealign.sae.b imports sparsealign.sae.a",
            "sparsealign/sae/b.py:2: sparsealign.sae.b imports sparsealign.sae.c",
            "sparsealign/sae/c.py:2: sparsealign.sae.c imports sparsealign.sae.a",
        ]
    ]
