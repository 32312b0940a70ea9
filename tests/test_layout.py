"""The package layout holds: no import cycles in ``jfsync/`` and the layers point one way.

The import graph is read from the source with :mod:`ast`, never by importing: one node per
module of ``jfsync/`` (a package is its ``__init__``), one edge per ``import``/``from … import``
of another jfsync module, at module level or inside a function or class body alike (a lazy
import inside a function is still a dependency, it only hides the cycle until run time).

Imports under ``if TYPE_CHECKING:`` are kept apart as type-only edges and count for both
checks. They never run, so Python would not trip over a circle they close; but a module that
needs another's types to be described depends on it all the same, and a circle hidden behind
``TYPE_CHECKING`` is still a circle to read and to untangle. The cure is a small ``Protocol`` (or
moving the shared state below both), as :mod:`jfsync.emulator.view` does for the emulator. For
the layer rules a type-only import counts when it is direct; longer chains follow runtime
imports only (what a layer pulls in when it runs).

``from package import name`` is an edge to ``package.name`` when that is a module, else to the
package. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__`` first; those implicit
parent-package edges are not added (every module would then depend on its own package's
``__init__``, which re-exports from it), the same choice static import checkers make.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "jfsync"

#: (importer prefix, forbidden prefix): no module under the first may import one under the
#: second, directly or through any chain of runtime imports.
LAYER_RULES = [
    ("jfsync.sync", "jfsync.ops"),
    ("jfsync.sync", "jfsync.service"),
    ("jfsync.jellyfin", "jfsync.sync"),
]


@dataclass
class Graph:
    """Modules and their imports: ``runtime`` edges and type-only ``typing`` edges."""

    modules: set[str]
    runtime: dict[str, set[str]] = field(default_factory=dict)
    typing: dict[str, set[str]] = field(default_factory=dict)

    def all_edges(self) -> dict[str, set[str]]:
        """Runtime and type-only imports together: every dependency a reader sees."""
        return {m: self.runtime.get(m, set()) | self.typing.get(m, set()) for m in self.modules}


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    """The dotted name of a file below ``root`` (a package is named by its folder)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(node: ast.AST, type_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement below ``node``, with whether only a type checker runs it."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, type_only
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _imports(child, True)
        for child in node.orelse:
            yield from _imports(child, type_only)
        return
    for child in ast.iter_child_nodes(node):
        yield from _imports(child, type_only)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module ``name`` loads: itself, or its longest prefix that is a jfsync module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(
    stmt: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> set[str]:
    names: list[str] = []
    if isinstance(stmt, ast.Import):
        names = [alias.name for alias in stmt.names]
    else:
        base = stmt.module or ""
        if stmt.level:
            anchor = importer.split(".")
            if not is_package:
                anchor.pop()
            anchor = anchor[: len(anchor) - (stmt.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in stmt.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in modules else base)
    found = {_resolve(n, modules) for n in names if n == "jfsync" or n.startswith("jfsync.")}
    return {m for m in found if m is not None and m != importer}


def build_graph(root: Path = PACKAGE_DIR) -> Graph:
    """Parse every module below ``root`` and collect its imports of other jfsync modules."""
    files = sorted(root.rglob("*.py"))
    graph = Graph({module_name(f, root) for f in files})
    for path in files:
        name = module_name(path, root)
        graph.runtime[name], graph.typing[name] = set(), set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for stmt, type_only in _imports(tree, False):
            targets = _targets(stmt, name, path.name == "__init__.py", graph.modules)
            (graph.typing if type_only else graph.runtime)[name].update(targets)
    return graph


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cycle_path(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete cycle through a component, as ``[a, b, …, a]``, to name in a failure."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(edges.get(node, set()) & component):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt not in parents:
                parents[nxt] = node
                frontier.append(nxt)
    raise AssertionError(f"no cycle through {sorted(component)}")


def reaches(edges: dict[str, set[str]], start: str, prefix: str) -> list[str] | None:
    """The shortest import chain from ``start`` to a module under ``prefix``, if any."""
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(edges.get(node, set())):
            if nxt in parents:
                continue
            parents[nxt] = node
            if nxt == prefix or nxt.startswith(prefix + "."):
                chain = [nxt]
                while (up := parents[chain[-1]]) is not None:
                    chain.append(up)
                return list(reversed(chain))
            frontier.append(nxt)
    return None


def test_graph_sees_the_package() -> None:
    """The walk finds the modules and imports it must judge (an empty graph proves nothing)."""
    graph = build_graph()
    assert "jfsync.service" in graph.modules
    assert "jfsync.emulator.app" in graph.modules
    assert "jfsync.emulator.http" in graph.runtime["jfsync.emulator.app"]
    assert sum(len(e) for e in graph.runtime.values()) > 100
    # The emulator's parts see the server through protocols, never by importing it.
    assert "jfsync.emulator.view" in graph.runtime["jfsync.emulator.app"]
    assert "jfsync.emulator.server" not in graph.all_edges()["jfsync.emulator.app"]


def test_checker_names_a_lazy_cycle(tmp_path: Path) -> None:
    """A cycle closed by a function-level import is found and named, and so is a type-only one."""
    pkg = tmp_path / "jfsync"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from jfsync.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import jfsync.sub.a\n")
    # typed -> d only for the type checker (the else branch runs), d -> typed at run time.
    (pkg / "typed.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from jfsync.sub import d\nelse:\n    import json\n"
    )
    (pkg / "sub" / "d.py").write_text("import jfsync.typed\n")
    graph = build_graph(pkg)
    assert graph.typing["jfsync.typed"] == {"jfsync.sub.d"}
    assert graph.runtime["jfsync.typed"] == set()
    lazy = {"jfsync.sub.a", "jfsync.sub.b", "jfsync.sub.c"}
    assert strongly_connected(graph.runtime) == [lazy]
    assert cycle_path(graph.runtime, lazy) == [
        "jfsync.sub.a",
        "jfsync.sub.b",
        "jfsync.sub.c",
        "jfsync.sub.a",
    ]
    typed = {"jfsync.sub.d", "jfsync.typed"}
    cycles = sorted(strongly_connected(graph.all_edges()), key=min)
    assert cycles == [lazy, typed]
    assert cycle_path(graph.all_edges(), typed) == ["jfsync.sub.d", "jfsync.typed", "jfsync.sub.d"]


def test_no_import_cycles() -> None:
    """No module of jfsync imports itself back through other modules, type-only imports included.

    A circle closed only under ``if TYPE_CHECKING:`` fails too: give the module that describes
    the other a ``Protocol`` of what it uses (see :mod:`jfsync.emulator.view`) instead.
    """
    graph = build_graph()
    edges = graph.all_edges()
    named = [
        " -> ".join(cycle_path(edges, c)) + f"  (all in the circle: {', '.join(sorted(c))})"
        for c in strongly_connected(edges)
    ]
    assert not named, "import cycles in jfsync/:\n  " + "\n  ".join(named)


def test_layers_point_one_way() -> None:
    """The replication core never reaches operations or the wiring; transport never the core."""
    graph = build_graph()
    both = graph.all_edges()
    broken: list[str] = []
    for importer, forbidden in LAYER_RULES:
        for module in sorted(graph.modules):
            if module != importer and not module.startswith(importer + "."):
                continue
            # Direct imports count even when type-only; chains follow runtime imports.
            direct = sorted(
                t for t in both[module] if t == forbidden or t.startswith(forbidden + ".")
            )
            chain = [module, direct[0]] if direct else reaches(graph.runtime, module, forbidden)
            if chain is not None:
                broken.append(f"{importer} must not import {forbidden}: " + " -> ".join(chain))
    assert not broken, "\n".join(broken)
