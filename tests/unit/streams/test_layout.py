"""streams/ has three rooms and their imports point one way; this parses every module to keep it so.

runtime/ (the running system) imports neither surface/ nor tools/; surface/ (API, HTTP, CLI) reaches tools/ only
lazily, inside the CLI commands that launch them; and no two modules import each other at module top level, so
import order never matters. Each check is tested on a small made-up package first, to show it can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ROOMS = ("runtime", "surface", "tools")
FORBIDDEN_ANYWHERE = {"runtime": ("surface", "tools")}  # not even inside a function
FORBIDDEN_AT_TOP = {"surface": ("tools",)}  # a lazy import inside a command function is how the CLI launches tools


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    top_level: bool  # False inside a function or class body, or under `if TYPE_CHECKING:`


def modules_under(folder: Path) -> dict[str, str]:
    """Dotted module name -> source, for every .py file of the package at ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path.read_text()
    return found


def edges(modules: dict[str, str], root: str = "streams") -> list[Edge]:
    """Imports between the given modules; ``from a import b`` where a.b is a module counts as importing a.b."""
    found = []
    for name, source in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node, top in _imports(ast.parse(source)):
            for target in _targets(node, package, modules):
                if target.split(".")[0] == root and target in modules and target != name:
                    found.append(Edge(name, target, node.lineno, top))
    return found


def room_violations(found: list[Edge]) -> list[str]:
    wrong = []
    for e in found:
        source_room, target_room = _room(e.source), _room(e.target)
        if target_room in FORBIDDEN_ANYWHERE.get(source_room or "", ()):
            wrong.append(f"{e.source}:{e.line} imports {e.target}")
        elif e.top_level and target_room in FORBIDDEN_AT_TOP.get(source_room or "", ()):
            wrong.append(f"{e.source}:{e.line} imports {e.target} at module top level (import it in the command)")
    return wrong


def cycles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of modules that import each other at module top level (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in found:
        if e.top_level:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, top))
            else:
                walk(child, top and not _runs_later(child))

    walk(tree, True)
    return found


def _runs_later(node: ast.AST) -> bool:
    """A function or class body runs when called, an `if TYPE_CHECKING:` block never: neither is an import cycle."""
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    with_parents: list[str] = []
    for name in names:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) not in with_parents:
                with_parents.append(".".join(parts[:i]))
    return with_parents


# ------------------------------------------------------------------------------------------------- the checks

MADE_UP = {
    "streams": "",
    "streams.runtime": "",
    "streams.runtime.a": "from streams.surface import b\n",
    "streams.surface": "",
    "streams.surface.b": "import streams.runtime.a\nfrom streams.tools.c import run\n",
    "streams.surface.lazy": "def cmd() -> None:\n    from streams.tools import c\n",
    "streams.tools": "",
    "streams.tools.c": "from . import d\n",
    "streams.tools.d": "from .c import run\n",
}


def test_the_room_check_catches_wrong_imports_and_lets_a_lazy_launch_through() -> None:
    wrong = room_violations(edges(MADE_UP))
    assert wrong == [
        "streams.runtime.a:1 imports streams.surface",
        "streams.runtime.a:1 imports streams.surface.b",
        "streams.surface.b:2 imports streams.tools at module top level (import it in the command)",
        "streams.surface.b:2 imports streams.tools.c at module top level (import it in the command)",
    ]


def test_the_cycle_check_finds_circles_through_relative_and_absolute_imports() -> None:
    assert cycles(edges(MADE_UP)) == [
        ["streams.runtime.a", "streams.surface.b"],
        ["streams.tools.c", "streams.tools.d"],
    ]


def test_every_streams_module_lives_in_a_room() -> None:
    flat = sorted(p.name for p in (REPO / "streams").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == [], f"put these in streams/runtime, streams/surface or streams/tools: {flat}"


def test_imports_point_one_way_between_the_rooms() -> None:
    modules = modules_under(REPO / "streams")
    assert any(name.startswith("streams.runtime.") for name in modules), "no streams/runtime modules found"
    assert room_violations(edges(modules)) == []


def test_no_import_cycle_between_streams_modules() -> None:
    assert cycles(edges(modules_under(REPO / "streams"))) == []


# ------------------------------------------------------------------------------- the memstream package on top

BELOW_MEMSTREAM = ("schemas", "processors", "infra", "streams")


def imports_of_memstream(modules: dict[str, str]) -> list[str]:
    """``module:line`` for every import of the top-level ``memstream`` package (anywhere, even in a function)."""
    found = []
    for name, source in modules.items():
        for node, _ in _imports(ast.parse(source)):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not (isinstance(node, ast.ImportFrom) and node.level) and any(
                t.split(".")[0] == "memstream" for t in targets
            ):
                found.append(f"{name}:{node.lineno}")
    return found


def test_the_memstream_check_catches_a_package_below_importing_it() -> None:
    made_up = {
        "infra.a": "import memstream\n",
        "streams.surface.b": "def f() -> None:\n    from memstream.client import Memory\n",
        "infra.c": "from . import memstream_helpers\nimport memstreamer\n",
    }
    assert imports_of_memstream(made_up) == ["infra.a:1", "streams.surface.b:2"]


def test_memstream_sits_on_top_and_nothing_below_imports_it() -> None:
    below: dict[str, str] = {}
    for package in BELOW_MEMSTREAM:
        below.update(modules_under(REPO / package))
    assert any(name.startswith("streams.surface.") for name in below)
    assert imports_of_memstream(below) == []
    top = modules_under(REPO / "memstream")
    assert "memstream.client" in top, "the memstream package is missing"
