"""No import cycles among d2nwg's modules, counting the imports inside functions.

An import inside a function only hides a cycle: the two modules still cannot be read, tested or moved
apart. The graph has one node per module (a package is its ``__init__``) and an edge for every
``import`` or ``from ... import`` anywhere in a module (``if TYPE_CHECKING:`` blocks excepted: they never
run). Importing a submodule (``import d2nwg.zoo.layout``, ``from d2nwg.zoo.model_zoo import layout``) is an edge to
that submodule, not to its package: Python finishes a half-imported package before it needs it again. Naming
the package itself (``import d2nwg.zoo.model_zoo``, ``from d2nwg.zoo.model_zoo import X`` where ``X`` is not a submodule) is an
edge to its ``__init__``, so a package that re-exports a submodule which imports the package back is a cycle.
Lazy registry strings (``"d2nwg.x:ATTR"``) are not edges: they are looked up after both modules have loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "d2nwg"


def module_names(root: Path, top: str = "d2nwg") -> dict[str, tuple[Path, bool]]:
    """``{module: (path, is_package)}`` for every ``.py`` file below ``root`` (the package folder ``top``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [top, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(tree: ast.AST):
    """Every import statement of ``tree``, inside functions too, leaving out ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for stmt in node.orelse for n in _imports(ast.Module(body=[stmt], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph(modules: dict[str, tuple[Path, bool]], top: str = "d2nwg") -> dict[str, set[str]]:
    """``{module: modules it imports}``, restricted to the modules of ``top``."""

    def known(name: str) -> str | None:  # the longest prefix of ``name`` that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names if a.name.split(".")[0] == top)
                continue
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] != top:
                continue
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base))
        edges.discard(None)
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return sorted(component)


def test_no_import_cycles():
    found = cycles(import_graph(module_names(PACKAGE)))
    assert found == [], "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "d2nwg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # an import inside a function still closes a cycle
        ({"a.py": "from d2nwg.b import B\n", "b.py": "def f():\n    from d2nwg.a import A\n"}, [["d2nwg.a", "d2nwg.b", "d2nwg.a"]]),
        # relative imports resolve against the importing module's package
        ({"p/__init__.py": "", "p/a.py": "from .b import B\n", "p/b.py": "from ..p import a\n"}, [["d2nwg.p.a", "d2nwg.p.b", "d2nwg.p.a"]]),
        # a package that re-exports a submodule which imports the package back
        ({"p/__init__.py": "from d2nwg.p.a import A\n", "p/a.py": "def f():\n    from d2nwg.p import B\n"}, [["d2nwg.p", "d2nwg.p.a", "d2nwg.p"]]),
        # a submodule importing a sibling through its package is not an edge to the package
        ({"p/__init__.py": "from d2nwg.p.a import A\n", "p/a.py": "from d2nwg.p import b\n", "p/b.py": ""}, []),
        # imports that only type checkers see never run
        ({"a.py": "from d2nwg.b import B\n", "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from d2nwg.a import A\n"}, []),
        # a lazy registry string is not an import
        ({"a.py": "from d2nwg.b import B\n", "b.py": "LAZY = 'd2nwg.a:A'\n"}, []),
    ],
)
def test_the_cycle_check_sees_what_python_would_import(tmp_path, files, expected):
    assert cycles(import_graph(module_names(_package(tmp_path, files)))) == expected
