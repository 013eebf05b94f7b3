"""No import circles among oarbench's modules: a name two modules share lives in the lower one.

The graph is read from the source with :mod:`ast` (nothing is imported). A node
is a module (``oarbench/x/y.py`` is ``oarbench.x.y``, a package's
``__init__.py`` is the package; an extension module built from ``oarbench/x/y.c``
is ``oarbench.x.y`` too, a leaf that imports nothing of the package). Edges, from the module that holds the
import statement:

* every ``import oarbench.a.b`` / ``from oarbench.a import b`` / relative
  import, wherever it stands: at module level, under ``if TYPE_CHECKING:``
  and inside functions alike. A lazy in-function import counts as an edge
  like any other: it only puts the circle off until the first call, and the
  two modules still depend on each other;
* ``from package import name`` goes to the submodule ``package.name`` where
  there is one, else to ``package`` (the name is defined in its
  ``__init__``, even when that package encloses the importer);
* importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so it is
  also an edge to each enclosing package, except those enclosing the importer
  itself (they are already being imported when it runs).

Imports of other distributions (numpy, torch, ...) are not nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oarbench"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for what counts)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files) | {module_name(p, root) for p in root.rglob("*.c")}
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def owner(name: str) -> str | None:  # the module that ``name`` (module or module.attribute) lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.level, node.module)
                # a submodule named in the list is the target; any other name lives in ``base``
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                mod = owner(target)
                if mod is None:
                    continue
                graph[name].add(mod)
                parts = mod.split(".")
                for i in range(1, len(parts)):
                    package = ".".join(parts[:i])
                    if not (name == package or name.startswith(package + ".")):
                        graph[name].add(package)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # iterative depth-first search: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a] & members))


def test_oarbench_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "oarbench.evaluate" in graph["oarbench.cli.evaluate_cmd"]  # the walk saw the package
    found = cycles(graph)
    assert found == [], "import circles: " + " | ".join(_describe(graph, c) for c in found)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_lazy_in_function_import_closes_a_circle(tmp_path):
    root = _package(tmp_path, {
        "low.py": "def f():\n    from pkg.high import X\n    return X\n",
        "high.py": "from pkg import low\nX = 1\n",
        "other.py": "import numpy\nfrom . import low\n",
    })
    graph = import_graph(root)
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.other"] == {"pkg.low"}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]


def test_importing_a_submodule_runs_its_package_init(tmp_path):
    # plots -> gallery.types looks acyclic, but gallery/__init__ imports build, which imports plots
    root = _package(tmp_path, {
        "plots.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.gallery.types import Tile\n",
        "gallery/__init__.py": "from pkg.gallery.build import build\n",
        "gallery/types.py": "class Tile: ...\n",
        "gallery/build.py": "from .types import Tile\nfrom pkg.plots import draw\n",
    })
    graph = import_graph(root)
    assert graph["pkg.gallery.build"] == {"pkg.gallery.types", "pkg.plots"}  # its own package is not an edge
    assert cycles(graph) == [["pkg.gallery", "pkg.gallery.build", "pkg.plots"]]
    (root / "plots.py").write_text("from pkg.tiles import Tile\n")
    (root / "tiles.py").write_text("class Tile: ...\n")
    assert cycles(import_graph(root)) == []
