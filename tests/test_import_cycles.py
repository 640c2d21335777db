"""No import circles among the project's own modules (engine, rest_bridge, protoserve).

A circle means neither module can be understood, tested or moved without the other, and it
breaks at import time as soon as one side uses the other at module level. Imports under
`if TYPE_CHECKING:` and inside functions count too: they are dependencies all the same.
"""
from __future__ import annotations

from pathlib import Path

from repo_imports import imported_modules, module_name, python_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "rest_bridge", "protoserve")
GENERATED = "protoserve/v1/"  # generated stubs import each other as protoc writes them


def import_graph(root: Path, files: list[str]) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from a.b import c` counts as importing a.b.c
    when that is a module (not a.b as well: `from . import sibling` is no dependency on the
    package's __init__), else a.b (c is an attribute)."""
    modules = {module_name(f): f for f in files
               if f.split("/")[0] in PACKAGES and not f.startswith(GENERATED)}
    graph: dict[str, set[str]] = {}
    for module, rel_path in modules.items():
        edges = set()
        found = imported_modules((root / rel_path).read_text(encoding="utf-8"), rel_path)
        submodules = {(line, name) for line, name in found if name in modules}
        for line, name in found:
            if any(line == other_line and other.startswith(name + ".")
                   for other_line, other in submodules):
                continue
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
    return sorted(found)


def test_no_import_cycles() -> None:
    found = cycles(import_graph(ROOT, python_files(ROOT)))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_finder_catches_synthetic_circles(tmp_path: Path) -> None:
    sources = {
        "engine/a.py": "from engine.b import B\n",
        "engine/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from engine.c import C\n",
        "engine/c.py": "def f():\n    from engine import a\n",  # a -> b -> c -> a
        "engine/d.py": "from engine.a import A\n",  # into the circle, not part of it
        "engine/pkg/__init__.py": "from engine.pkg.e import E\n",
        "engine/pkg/e.py": "from . import f\n",
        "engine/pkg/f.py": "from engine.pkg.e import E\n",  # e <-> f through a relative import
        "rest_bridge/x.py": "import protoserve.v1.common_pb2\nfrom protoserve import y\n",
        "protoserve/y.py": "import json\n",
        "protoserve/v1/common_pb2.py": "from protoserve.v1 import other_pb2\n",
        "protoserve/v1/other_pb2.py": "from protoserve.v1 import common_pb2\n",
    }
    for rel_path, text in sources.items():
        (tmp_path / rel_path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel_path).write_text(text)
    found = cycles(import_graph(tmp_path, sorted(sources)))
    assert found == [["engine.a", "engine.b", "engine.c"], ["engine.pkg.e", "engine.pkg.f"]]
