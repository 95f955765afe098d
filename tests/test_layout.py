"""The shape of the dilo package: imports flow one way, modules read in one sitting, and
parsing a config does not pull in torch (tools/import_graph.py prints the whole graph)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, child_env
from tools import import_graph

MAX_MODULE_LINES = 450


def test_no_import_cycle_in_dilo():
    found = import_graph.cycles(import_graph.build(REPO / "dilo"))
    assert not found, "import cycles in dilo/: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_in_dilo_is_over_450_lines():
    graph = import_graph.build(REPO / "dilo")
    long = {name: m.lines for name, m in graph.items() if m.lines > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


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
