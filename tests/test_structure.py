"""The project's import structure, read from the source (issue 13).

The graph: every ``.py`` under the folders that pyproject's ``package-dir`` maps into ``quantmill``,
named as it is imported; an edge for every import of a project module anywhere in the file: at
module level, inside functions, under ``if TYPE_CHECKING:``. ``from quantmill.x import y`` is an
import of ``quantmill.x.y`` when that is a module, else of ``quantmill.x``; importing a module runs
its packages' ``__init__`` first, so those count too (except the importer's own packages, which
are running already). The graph must be acyclic: a cycle, however lazily its imports are written,
is two modules that each need the other, and neither can be understood or moved alone.
"""
from __future__ import annotations

import ast
import itertools
import tomllib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "quantmill"
CLI_PACKAGE = "quantmill.cli"


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # path:line
    how: str  # "module level", "in a function", "TYPE_CHECKING"


def module_files() -> dict[str, Path]:
    """Module name -> source file, through pyproject's [tool.setuptools.package-dir]."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "__pycache__" in parts or not all(part.isidentifier() for part in parts):
                continue
            name = ".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))
            modules.setdefault(name, path)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, how: str = "module level") -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under ``node``, with where it sits."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, how
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _imports(stmt, "TYPE_CHECKING")
        for stmt in node.orelse:
            yield from _imports(stmt, how)
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and how == "module level":
        how = "in a function"
    for child in ast.iter_child_nodes(node):
        yield from _imports(child, how)


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges() -> list[Edge]:
    modules = module_files()
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    edges: list[Edge] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own_package = importer if importer in packages else importer.rpartition(".")[0]
        for node, how in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            found: set[str] = set()
            for target in targets:
                while target and target not in modules:  # `import quantmill.x.y` where y is a name
                    target = target.rpartition(".")[0]
                if target.split(".")[0] == PACKAGE:
                    found |= {target, *(p for p in _packages_of(target) if p not in _packages_of(importer))}
            for imported in sorted(found - {importer}):
                edges.append(Edge(importer, imported, f"{path.relative_to(ROOT)}:{node.lineno}", how))
    return edges


Graph = dict[str, dict[str, list[Edge]]]


def _graph(edges: list[Edge]) -> Graph:
    graph: Graph = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, []).append(edge)
        graph.setdefault(edge.imported, {})
    return graph


def _components(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:  # recursive: the graph has a few hundred modules
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _shortest_cycle(graph: Graph, start: str, members: set[str]) -> list[str]:
    paths: dict[str, list[str]] = {start: [start]}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ == start:
                return paths[node] + [start]
            if succ in members and succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    raise AssertionError(f"{start} is in a component but on no cycle")


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """For each strongly connected component, the shortest cycle through each of its modules (deduplicated)."""
    graph = _graph(edges)
    cycles: list[list[str]] = []
    for component in _components(graph):
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            first = cycle.index(min(cycle[:-1]))
            rotated = cycle[first:-1] + cycle[:first] + [cycle[first]]
            if rotated not in cycles:
                cycles.append(rotated)
    return cycles


def describe(cycle: list[str], edges: list[Edge]) -> str:
    graph = _graph(edges)
    lines = [" -> ".join(cycle)]
    for importer, imported in itertools.pairwise(cycle):
        sites = "; ".join(f"{e.where} {e.how}" for e in graph[importer][imported])
        lines.append(f"    {importer} -> {imported}: {sites}")
    return "\n".join(lines)


def test_the_graph_is_read_from_the_source() -> None:
    """Guards the graph builder itself: the mapping and a few known edges."""
    modules = module_files()
    assert modules["quantmill.quantize.gguf.libllama"] == ROOT / "quantize" / "gguf" / "libllama.py"
    assert modules["quantmill.convert.arch"] == ROOT / "convert" / "arch" / "__init__.py"
    edges = {(e.importer, e.imported): e for e in import_edges()}
    assert ("quantmill.quantize.gguf.libllama", "quantmill.quantize.gguf.inspect") in edges
    # a function-local import, and the package __init__ it runs first
    local = edges[("quantmill.quantize.gguf.libllama", "quantmill.quantize.gguf.imatrix")]
    assert local.how == "in a function"
    assert ("quantmill.quantize.gguf.inspect", "quantmill.convert.arch") in edges
    assert ("quantmill.quantize.gguf.inspect", "quantmill.convert") in edges
    # a module's own packages are already running when it imports: no edge to them
    assert ("quantmill.convert.arch.llama", "quantmill.convert.arch") not in edges


def test_cycle_finder_reports_a_chain() -> None:
    edges = [Edge("a", "b", "a.py:1", "module level"), Edge("b", "c", "b.py:2", "in a function"),
             Edge("c", "a", "c.py:3", "TYPE_CHECKING"), Edge("c", "d", "c.py:4", "module level")]
    cycles = find_cycles(edges)
    assert cycles == [["a", "b", "c", "a"]]
    assert describe(cycles[0], edges).splitlines()[2] == "    b -> c: b.py:2 in a function"
    assert find_cycles(edges[:2] + edges[3:]) == []


def test_import_graph_is_acyclic() -> None:
    edges = import_edges()
    cycles = find_cycles(edges)
    assert not cycles, f"{len(cycles)} import cycle(s) among the project's modules:\n" + "\n".join(
        describe(cycle, edges) for cycle in cycles)


def test_click_only_in_the_cli_package() -> None:
    modules = module_files()
    offenders = []
    for name, path in modules.items():
        if name == CLI_PACKAGE or name.startswith(CLI_PACKAGE + "."):
            continue
        for node, _how in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "click" or n.startswith("click.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "click imported outside quantmill/cli/: " + ", ".join(offenders)


def test_no_import_module_string_tables() -> None:
    """Registries are plain imports: no importlib.import_module (nor __import__) in the project's code."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"tests", ".venv", "build"} or relative.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name in {"import_module", "__import__"}:
                    offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, "import_module/__import__ outside tests: " + ", ".join(offenders)
