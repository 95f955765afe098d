"""README stays true to the code: its config table is generated, its commands exist."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_config_table_is_current():
    res = subprocess.run([sys.executable, "tools/config_table.py", "--check", "README.md"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_quick_start_targets_exist():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "make train" in readme and "make test" in readme
    assert "\ntrain:" in makefile and "\ntest:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()
