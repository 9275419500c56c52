"""The import graph of builder/ and trainer/, read from the source (ast): every import, at module level or inside a
function, as the module it names. tests/test_layers.py holds the rules; `python tests/layers.py` prints the rooms'
graph."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "trainer")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) starts with."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in known:
            return candidate
    return None


def imports(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    known = known or modules()
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    target = _resolve(name, known)
                    if target and target != mod:
                        found.add(target)
        graph[mod] = found
    return graph


def room(mod: str) -> str:
    """builder.cli, builder.core, ..., trainer.loop; trainer.config is a room of one module."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        rooms.setdefault(room(mod), set()).update(room(t) for t in targets if room(t) != room(mod))
    return rooms


if __name__ == "__main__":
    g = imports()
    for r, targets in sorted(room_graph(g).items()):
        print(f"{r:<18} -> {', '.join(sorted(targets))}")
    print("module cycles:", cycles(g))
    print("room cycles:", cycles(room_graph(g)))
