"""The library's import graph has no cycle: no module imports one that (directly or not) imports it back, the
package root included, and imports inside functions (lazy ones) count. Read from the source (AST), so a lazy
import that never runs in the suite is still seen."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_ens

PACKAGE = Path(hf_ens.__file__).parent


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for file in package.rglob("*.py"):
        parts = ("hf_ens", *file.relative_to(package).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = file
    return mods


def _imports(name: str, file: Path, mods: dict[str, Path]) -> set[str]:
    """The hf_ens modules `name` imports anywhere in its source (``from . import x`` is module ``x``)."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:  # hf_ens.x.Y -> hf_ens.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = _modules(package)
    return {name: _imports(name, file, mods) for name, file in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_hf_ens():
    graph = import_graph()
    assert _cycles(graph) == []


def test_no_submodule_imports_the_package_root():
    graph = import_graph()
    assert sorted(name for name, deps in graph.items() if "hf_ens" in deps) == []


def test_the_library_never_imports_trainers_or_recipes():
    bad = {
        name: sorted(t for t in _raw_imports(file) if t.split(".")[0] in ("trainers", "recipes", "tests"))
        for name, file in _modules().items()
    }
    assert {k: v for k, v in bad.items() if v} == {}


def _raw_imports(file: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_walker_sees_lazy_and_root_cycles(tmp_path):
    """The check can fail: a function-level import closing a circle, and a submodule importing the root."""
    package = tmp_path / "hf_ens"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (package / "b.py").write_text("def g():\n    from .a import f\n\n    return f\n")
    (package / "c.py").write_text("from . import a\nimport hf_ens\n")
    graph = import_graph(package)
    assert graph["hf_ens.c"] == {"hf_ens.a", "hf_ens"}
    assert _cycles(graph) == [["hf_ens.a", "hf_ens.b"]]
    (package / "a.py").write_text("def f():\n    from .c import x\n")
    (package / "b.py").write_text("")
    assert _cycles(import_graph(package)) == [["hf_ens", "hf_ens.a", "hf_ens.c"]]
