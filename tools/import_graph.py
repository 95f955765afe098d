"""The import graph of the dilo package, read statically (ast): which dilo modules each
module imports, how long each module is and its longest class; exits 1 on an import cycle.

    python tools/import_graph.py            # the graph, then the cycles (if any)
    python tools/import_graph.py --json     # the same as one JSON document

Every import statement counts, wherever it stands: at the top, inside a function (a lazy
import is still a dependency) and under `if TYPE_CHECKING:` (a type hint that names a
module above you is a dependency too). Each edge says how it is made, the strongest way
found: `top`, `local` (in a function or class body) or `typing`. Importing
`dilo.comm.swarm` also runs `dilo/__init__.py` and `dilo/comm/__init__.py`; those implicit
edges are not drawn (they would make every module depend on the package that lists it),
but `from dilo import X` is an edge to the package `dilo` itself.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIND_ORDER = {"top": 0, "local": 1, "typing": 2}


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    longest_class: tuple[str, int] | None
    """(name, lines) of the longest class defined anywhere in the module, or None."""
    imports: dict[str, str] = field(default_factory=dict)
    """dilo module imported -> how: top, local or typing."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, kind) for every Import/ImportFrom in the tree."""
    def walk(node: ast.AST, kind: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                yield from walk(child, "local" if kind == "top" else kind)
            else:
                yield from walk(child, kind)
    yield from walk(tree, "top")


def _targets(node: ast.Import | ast.ImportFrom, current: str, is_package: bool, known: set[str]) -> list[str]:
    """The dilo modules one import statement names."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return [b for b in bases if b in known]
    if node.level:  # relative: from . import x / from .mod import y
        package = current if is_package else current.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = ".".join(x for x in (package, node.module) if x)
    else:
        base = node.module or ""
    found = []
    for alias in node.names:  # `from dilo.comm import swarm` names the module dilo.comm.swarm
        sub = f"{base}.{alias.name}"
        if sub in known:
            found.append(sub)
        elif base in known:
            found.append(base)
    return list(dict.fromkeys(found))


def build(root: Path = REPO / "dilo") -> dict[str, Module]:
    """Every module of the package under root, with its dilo imports."""
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path, root)
        text = path.read_text()
        tree = ast.parse(text, str(path))
        classes = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        mod = Module(name, path, len(text.splitlines()), max(classes, key=lambda c: c[1]) if classes else None)
        for node, kind in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", known):
                old = mod.imports.get(target)
                if target != name and (old is None or KIND_ORDER[kind] < KIND_ORDER[old]):
                    mod.imports[target] = kind  # the strongest kind wins: top, then local
        graph[name] = mod
    return graph


def cycles(graph: dict[str, Module]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v].imports:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(graph, comp) for comp in components]


def _one_cycle(graph: dict[str, Module], comp: list[str]) -> list[str]:
    """A shortest path from comp[0] back to itself inside the component."""
    members, start = set(comp), comp[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v].imports):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {comp}")


def render(graph: dict[str, Module], found: list[list[str]]) -> str:
    width = max(len(n) for n in graph)
    out = []
    for name, mod in sorted(graph.items()):
        cls = f"; class {mod.longest_class[0]} {mod.longest_class[1]}" if mod.longest_class else ""
        out.append(f"{name:<{width}}  {mod.lines:>4} lines{cls}")
        for target, kind in sorted(mod.imports.items()):
            out.append(f"{'':<{width}}    -> {target}" + ("" if kind == "top" else f" ({kind})"))
    out.append("")
    if found:
        out.append(f"{len(found)} import cycle(s):")
        out.extend("  " + " -> ".join(c) for c in found)
    else:
        out.append("no import cycle")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / "dilo", help="the package directory (default: dilo/)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = ap.parse_args(argv)
    if not (args.root / "__init__.py").is_file():
        ap.error(f"--root {args.root} is not a package directory (no __init__.py)")
    graph = build(args.root)
    found = cycles(graph)
    if args.json:
        doc = {"modules": {n: {"lines": m.lines, "longest_class": m.longest_class, "imports": m.imports}
                           for n, m in sorted(graph.items())},
               "cycles": found}
        print(json.dumps(doc, indent=1))
    else:
        print(render(graph, found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
