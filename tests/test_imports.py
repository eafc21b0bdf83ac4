"""The library's imports run one way: no import circle inside framework/, and nothing from recipes/, tests/ or
benchmarks/ (DESIGN.md, "Layers").

The graph is read from the source with `ast`, so it holds every import statement: module level, deferred inside
functions, and under `if TYPE_CHECKING:`. A deferred import is exactly how a circle hides at run time (the circle
imports fine because the late import runs after both modules exist), and an annotation-only import still says which
way a layer depends. Only explicit statements count: importing `framework.a.b` also runs `framework/__init__.py` and
`framework/a/__init__.py` implicitly, but those are not edges here. Were they counted, every submodule would depend on
the package entry that imports it, and a package `__init__` that re-exports its submodules (framework/__init__.py,
framework/techniques/__init__.py) would be a circle by construction. A real circle through an `__init__` needs an
explicit `from framework import X` in a submodule, and that is an edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "framework"
#: Top-level packages of this repository that the library must never import.
OUTSIDE_THE_LIBRARY = ("recipes", "tests", "benchmarks")


def framework_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package's `__init__.py` is the package's own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(name: str, path: Path) -> list[tuple[str, int]]:
    """(dotted module name, line) for every import statement in the file, relative imports made absolute.

    `from a.b import c` yields `a.b.c` (which `resolve` maps to module `a.b.c` if there is one, else to `a.b`).
    """
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` in framework/a/b.py is framework.a
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The framework module that `dotted` (a module, or a name inside one) belongs to; None outside framework."""
    while dotted:
        if dotted in modules:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def import_graph() -> tuple[dict[str, dict[str, int]], list[str]]:
    """{module: {imported framework module: line}}, and the imports of recipes/tests/benchmarks found."""
    modules = framework_modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    forbidden = []
    for name, path in modules.items():
        for dotted, line in imported_names(name, path):
            if dotted.split(".")[0] in OUTSIDE_THE_LIBRARY:
                forbidden.append(f"{path.relative_to(ROOT)}:{line} imports {dotted}")
            target = resolve(dotted, modules)
            if target is not None and target != name:  # `from framework.x import y` inside framework.x itself
                graph[name].setdefault(target, line)
    return graph, forbidden


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the ~70 modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def circle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """The shortest path from the component's first module back to itself, staying inside the component."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor not in members or successor in came_from:
                    continue
                came_from[successor] = node
                if successor == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(successor)
        frontier = following
    raise AssertionError(f"no circle found in component {component}")  # cannot happen for a real component


def describe(circle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = framework_modules()
    steps = [f"{a} (line {graph[a][b]} of {modules[a].relative_to(ROOT)})" for a, b in zip(circle, circle[1:])]
    return " -> ".join(steps + [circle[-1]])


def test_framework_has_no_import_circle():
    graph, _ = import_graph()
    found = tangles(graph)
    assert not found, "import circle(s) in framework/:\n" + "\n".join(
        f"  {len(component)} modules tied together ({', '.join(component)}); one circle (each arrow: the importer, "
        f"the line of its import):\n    {describe(circle_in(component, graph), graph)}" for component in found)


def test_framework_never_imports_recipes_tests_or_benchmarks():
    _, forbidden = import_graph()
    assert not forbidden, "framework/ must not import these:\n" + "\n".join(forbidden)


def test_models_and_layers_never_import_plug_ins():
    """A model (and the layers it is built from) works without the technique machinery: a plug-in may reach into a
    model, never the other way round (the checkpointing kernel GPT uses lives in framework/nn/ for that reason)."""
    graph, _ = import_graph()
    plug_ins = [f"{module} imports {target}" for module, targets in graph.items()
                if module.startswith(("framework.models", "framework.nn")) for target in targets
                if target == "framework.technique" or target.startswith("framework.techniques")]
    assert not plug_ins, "\n".join(plug_ins)


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"d": 5}}
    assert tangles(graph) == [["a", "b", "c"]]
    assert circle_in(["a", "b", "c"], graph) == ["a", "b", "c", "a"]
    assert tangles({"a": {"b": 1}, "b": {}}) == []


def test_imports_resolve_to_modules():
    modules = {"framework": Path(), "framework.x": Path(), "framework.x.y": Path()}
    assert resolve("framework.x.y", modules) == "framework.x.y"
    assert resolve("framework.x.Thing", modules) == "framework.x"
    assert resolve("framework.console", modules) == "framework"  # a name the package entry defines
    assert resolve("torch.nn", modules) is None


#: Run in a subprocess: argv[1] is the package folder, argv[2:] the modules to import, each in turn.
IMPORT_EACH = r"""
import importlib, sys, traceback, types

failed = []
for name in sys.argv[2:]:
    for loaded in [m for m in sys.modules if m == "framework" or m.startswith("framework.")]:
        del sys.modules[loaded]
    if name != "framework":  # a bare package: submodules load, framework/__init__.py does not run
        stub = types.ModuleType("framework")
        stub.__path__ = [sys.argv[1]]
        sys.modules["framework"] = stub
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(f"{name}:\n{traceback.format_exc()}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each framework module imported first, in a `sys.modules` cleared of the framework (third-party libraries stay
    loaded, so this takes seconds, not one interpreter per module).

    The package entry is stubbed while it runs: a real `import framework.x` runs framework/__init__.py first, which
    imports nearly everything in one fixed order, and that would hide a module that only imports when something else
    was imported before it. With the stub, each module's own imports decide the order. The real entry comes last.
    """
    names = sorted(framework_modules(), key=lambda name: name == "framework")  # the real entry last
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(PACKAGE), *names], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"modules that failed to import:\n{result.stdout}\n{result.stderr[-3000:]}"
