"""The modules of ``hap`` import each other without a cycle: read top to bottom, each module needs only
those below it.

Every ``import`` and ``from ... import`` statement counts, wherever it is: at module level, inside a
function (a lazy import is still a dependency; one that only dodges a cycle hides it), and under
``if TYPE_CHECKING:``. Lazy imports of torch, transformers or matplotlib inside CLI handlers (to keep
``hap --help`` fast, ``tests/test_cli_speed.py``) are imports of other packages and do not enter the graph;
nor do the ``_EXPORTS`` of the packages' ``__init__`` (attributes resolved on first use, not imports).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import hap

# (importer, imported, why) of imports that may close a cycle, each allowed only under TYPE_CHECKING (never
# run). hap.display renders circuits, metrics and explanations, and their ``_repr_html_`` call it.
TYPE_ONLY_EXEMPT = (
    ("hap.display", "hap.circuit", "annotations of the view of a Circuit"),
    ("hap.display", "hap.evaluation", "annotations of the view of Metrics"),
    ("hap.display", "hap.explain", "annotations of the view of an Explanation"),
)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int
    where: str  # "module level", "in a function" or "type only"

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.path.name}:{self.line}, {self.where})"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its ``__init__``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement of a module, with where it is."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, where))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    visit(ast.Module(body=[statement], type_ignores=[]), "type only")
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), where)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "in a function" if where == "module level" else where)
            else:
                visit(child, where)

    visit(tree, "module level")
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    """The imports of module ``name`` that name a module of the package (relative ones resolved; ``from p
    import x`` is an import of ``p.x`` when that is a module, else of ``p``)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    edges = []
    for statement, where in _statements(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets = []
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        else:
            if statement.level:
                base = here[: len(here) - statement.level + 1]
                source = ".".join(base + ([statement.module] if statement.module else []))
            else:
                source = statement.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in statement.names]
        for target in targets:
            while target and target not in modules:  # import a.b.c of a module a.b: a.b
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == package and target != name:
                edges.append(Import(name, target, path, statement.lineno, where))
    return edges


def import_graph(root: Path, package: str) -> dict[str, list[Import]]:
    """importer -> its imports of the package's modules."""
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules, package) for name, path in modules.items()}


def cycles(graph: dict[str, list[Import]], exempt: set[tuple[str, str]] = frozenset()) -> list[list[Import]]:
    """One cycle per strongly connected group of modules (Tarjan), as the imports that close it; type-only
    imports listed in ``exempt`` are left out of the graph."""
    edges = {name: [edge for edge in imports if not (edge.where == "type only" and
                                                     (edge.importer, edge.imported) in exempt)]
             for name, imports in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for edge in edges[name]:
            if edge.imported not in index:
                connect(edge.imported)
                low[name] = min(low[name], low[edge.imported])
            elif edge.imported in stack:
                low[name] = min(low[name], index[edge.imported])
        if low[name] == index[name]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(group)

    for name in sorted(edges):
        if name not in index:
            connect(name)
    found = []
    for group in groups:  # the shortest way round from the group's first module, by breadth-first search
        start = min(group)
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        while queue:
            name = queue.pop(0)
            for edge in sorted(edges[name], key=lambda e: e.imported):
                if edge.imported == start:
                    found.append(paths[name] + [edge])
                    queue = []
                    break
                if edge.imported in group and edge.imported not in paths:
                    paths[edge.imported] = paths[name] + [edge]
                    queue.append(edge.imported)
    return found


HAP_ROOT = Path(hap.__file__).parent


def test_no_import_cycle_among_hap_modules():
    graph = import_graph(HAP_ROOT, "hap")
    found = cycles(graph, {(importer, imported) for importer, imported, _ in TYPE_ONLY_EXEMPT})
    assert not found, "import cycles among hap's modules:\n" + "\n".join(
        "  " + " -> ".join([cycle[0].importer] + [edge.imported for edge in cycle]) + "\n"
        + "".join(f"      {edge}\n" for edge in cycle) for cycle in found)


def test_every_exemption_is_a_type_only_import_that_is_still_there():
    graph = import_graph(HAP_ROOT, "hap")
    for importer, imported, why in TYPE_ONLY_EXEMPT:
        kinds = {edge.where for edge in graph[importer] if edge.imported == imported}
        assert kinds == {"type only"}, f"{importer} -> {imported} ({why}): found {kinds or 'no import'}"


def test_the_graph_sees_relative_function_level_and_type_only_imports():
    graph = import_graph(HAP_ROOT, "hap")
    edges = {(edge.importer, edge.imported, edge.where) for imports in graph.values() for edge in imports}
    assert ("hap.ablation", "hap.reference", "module level") in edges
    assert ("hap.report.html", "hap.report.blocks", "module level") in edges  # from .blocks import ...
    assert ("hap.report.html", "hap", "module level") in edges  # from .. import __version__
    assert ("hap.cli", "hap.discovery", "in a function") in edges
    assert ("hap.display", "hap.circuit", "type only") in edges
    assert ("hap.tasks.splits", "hap.tasks.ioi", "module level") in edges  # from . import greater_than, ioi


def test_a_cycle_hidden_in_a_function_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("import os\n")
    (package / "a.py").write_text("from . import low\nfrom .sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from ..a import low\n    return low\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n")
    (package / "d.py").write_text("from .c import TYPE_CHECKING\n")
    graph = import_graph(package, "pkg")
    found = cycles(graph)
    named = sorted([edge.importer for edge in cycle] for cycle in found)
    assert named == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
    a_cycle = next(cycle for cycle in found if cycle[0].importer == "pkg.a")
    assert [edge.where for edge in a_cycle] == ["module level", "in a function"]
    assert str(a_cycle[1]) == "pkg.sub.b -> pkg.a (b.py:2, in a function)"
    left = cycles(graph, {("pkg.c", "pkg.d")})  # the type-only import exempted: that cycle is gone
    assert [[edge.importer for edge in cycle] for cycle in left] == [["pkg.a", "pkg.sub.b"]]


def test_hap_entry_point_survives_its_submodule_being_imported_first():
    """A package attribute named like a submodule is replaced by that submodule when it is imported first
    (``import hap.discovery`` imports ``hap.hybrid``): HAP's entry point is exported as ``hap.run_hap``."""
    import subprocess
    import sys

    code = ("import hap.discovery, hap; from hap.hybrid import hybrid; "
            "assert hap.run_hap is hybrid and callable(hap.run_hap); "
            "assert hap.hybrid.__name__ == 'hap.hybrid'; "
            "assert all(not isinstance(getattr(hap, n), type(hap)) for n in hap.__all__), 'an export is a module'")
    subprocess.run([sys.executable, "-c", code], check=True)
