"""The shape of the dilo package: imports flow one way, modules and classes read in one
sitting, and parsing a config does not pull in torch (tools/import_graph.py prints the whole
graph)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO, child_env
from tools import import_graph

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250

# Known to be over the limits, each capped at its length today so it cannot grow; an entry
# that is no longer over the limit fails too, so the list only shrinks.
LONG_MODULES: dict[str, int] = {}
LONG_CLASSES = {
    "dilo.comm.swarm.SwarmGroup": 287,  # the swarm's Group: rounds, state, members (later work)
}


def class_lengths(root) -> dict[str, int]:
    """`module.Class` (nested classes as `module.Outer.Inner`) -> its lines, from the source."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    out[f"{prefix}.{child.name}"] = child.end_lineno - child.lineno + 1
                    walk(child, f"{prefix}.{child.name}")
                else:
                    walk(child, prefix)

        walk(ast.parse(path.read_text(encoding="utf-8")), module)
    return out


def over_limit(sizes: dict[str, int], limit: int, known: dict[str, int]) -> list[str]:
    """What breaks the limit: a new long one, a known one grown past its cap, a stale entry."""
    bad = [f"{name}: {n} lines (limit {limit})" for name, n in sizes.items()
           if n > limit and name not in known]
    bad += [f"{name}: {sizes[name]} lines, more than its cap {cap}" for name, cap in known.items()
            if name in sizes and sizes[name] > cap]
    bad += [f"{name}: {sizes.get(name, 'gone')} lines, no longer over {limit}: drop it from the list"
            for name in known if sizes.get(name, 0) <= limit]
    return bad


def test_no_import_cycle_in_dilo():
    found = import_graph.cycles(import_graph.build(REPO / "dilo"))
    assert not found, "import cycles in dilo/: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_in_dilo_is_over_400_lines():
    graph = import_graph.build(REPO / "dilo")
    bad = over_limit({name: m.lines for name, m in graph.items()}, MAX_MODULE_LINES, LONG_MODULES)
    assert not bad, "module sizes in dilo/: " + "; ".join(bad)


def test_no_class_in_dilo_is_over_250_lines():
    bad = over_limit(class_lengths(REPO / "dilo"), MAX_CLASS_LINES, LONG_CLASSES)
    assert not bad, "class sizes in dilo/: " + "; ".join(bad)


def test_the_size_check_names_new_grown_and_stale_entries():
    sizes = {"a": 10, "b": 30, "c": 25}
    assert over_limit(sizes, 20, {"b": 30, "c": 25}) == []
    assert over_limit(sizes, 20, {"b": 30}) == ["c: 25 lines (limit 20)"]
    assert over_limit(sizes, 20, {"b": 29, "c": 25}) == ["b: 30 lines, more than its cap 29"]
    assert over_limit(sizes, 20, {"a": 12, "b": 30, "c": 25, "d": 40}) == [
        "a: 10 lines, no longer over 20: drop it from the list",
        "d: gone lines, no longer over 20: drop it from the list"]


def test_importing_the_config_does_not_import_torch():
    code = "import sys, dilo.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=child_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", f"import dilo.config imports torch: {res.stdout.strip()}"


def test_the_graph_tool_finds_cycles_of_every_kind(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n\nclass A:\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n")
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    graph = import_graph.build(pkg)
    assert graph["pkg"].imports == {"pkg.a": "top"}
    assert graph["pkg.a"].imports == {"pkg.sub.b": "top"} and graph["pkg.a"].longest_class == ("A", 2)
    assert graph["pkg.sub.b"].imports == {"pkg.c": "typing"}
    assert graph["pkg.c"].imports == {"pkg.a": "local"}
    assert import_graph.cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (pkg / "sub" / "b.py").write_text("")
    assert import_graph.cycles(import_graph.build(pkg)) == []
