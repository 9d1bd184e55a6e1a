"""The project's rooms, their layers, and the imports between them, read from the source with `ast`.

A room is a top-level package or module, or one of runtime's sub-packages. A room may import itself
and the rooms of lower layers, never a room of its own layer or above; no module may reach itself
through its imports. Every import counts, also one inside a function: a lazy import still runs.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Top to bottom. `bench` may import the tests' tiny models; nothing of the product imports either.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bench",),
    ("tests",),
    ("api", "app", "convert"),  # entry points: the server, the tray app, the conversion CLI
    ("runtime",),  # the engine
    ("runtime.chat", "runtime.cpu"),  # the engine's parts: text <-> tokens, and the Linux CPU fast path
    ("converters",),
    ("cache",),
    ("settings", "errors", "hardware"),  # bottom modules: import nothing of ours
)
SUB_ROOMS = ("runtime.chat", "runtime.cpu")
SKIPPED_FOLDERS = {".venv", ".git", "node_modules", "build", "__pycache__"}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.imported}"


def layer_of(room: str) -> int:
    return next(index for index, rooms in enumerate(LAYERS) if room in rooms)


def room_of(module: str) -> str:
    sub = next((sub for sub in SUB_ROOMS if module == sub or module.startswith(sub + ".")), None)
    return sub or module.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path) -> dict[str, Path]:
    """Every module of the rooms in LAYERS, by dotted name."""
    tops = {room.split(".")[0] for rooms in LAYERS for room in rooms}
    files = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0].removesuffix(".py") in tops and not SKIPPED_FOLDERS & set(relative.parts):
            files[module_name(path, root)] = path
    return files


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """Each dotted name an import statement of the file may bind, with its line (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base] if base else kept)
            names += [(base, node.lineno)] + [(f"{base}.{alias.name}".lstrip("."), node.lineno) for alias in node.names]
    return names


def project_imports(root: Path) -> list[Edge]:
    """Module-to-module imports inside the project, each resolved to the longest module name that exists."""
    files = source_files(root)
    edges = []
    for module, path in files.items():
        for name, line in imported_names(path, module):
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.append(Edge(module, target, f"{path.relative_to(root)}:{line}"))
    return edges


def layer_violations(edges: list[Edge]) -> list[Edge]:
    """Imports of a room of the same layer or one above."""
    bad = []
    for edge in edges:
        mine, theirs = room_of(edge.importer), room_of(edge.imported)
        if mine != theirs and layer_of(theirs) <= layer_of(mine):
            bad.append(edge)
    return bad


def circles(edges: list[Edge]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (Tarjan's strongly connected components)."""
    graph = defaultdict(set)
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    order, lowest, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        order[node] = lowest[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in order:
                visit(neighbour)
                lowest[node] = min(lowest[node], lowest[neighbour])
            elif neighbour in on_stack:
                lowest[node] = min(lowest[node], order[neighbour])
        if lowest[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in list(graph):
        if node not in order:
            visit(node)
    return found


def room_dependencies(edges: list[Edge]) -> set[tuple[str, str]]:
    """(importer, imported) pairs of distinct rooms."""
    return {(room_of(e.importer), room_of(e.imported)) for e in edges if room_of(e.importer) != room_of(e.imported)}
