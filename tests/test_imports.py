"""No import circle in `runner/` and `workers/`: the graph of imports between the project's modules, read from the
source with `ast`, has no cycle.

Every import statement counts, at module level or inside a function: a function-level import is a dependency all
the same (it only runs later), and hiding a circle inside a function is how circles grow back. `from pkg import name`
counts as an import of `pkg.name` when that is a module, else of `pkg`. Importing `a.b.c` runs the `__init__` of
`a` and `a.b` first, but that is not an edge: a package's `__init__` may import its submodules."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parent.parent
PACKAGES = ("runner", "workers")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_runner_and_workers():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    edges = sum(len(v) for v in graph.values())
    print(f"{len(graph)} modules, {edges} imports between them")
    assert len(graph) > 30 and edges > 50  # the walk found the project
    assert graph["workers.learner.sources.factory"] >= {"workers.learner.sources.builtin", "runner.config"}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
