"""README stays true to the code: its config table is generated, its commands exist."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


LAUNCH_SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=lambda p: p.name)
def test_launch_script_help(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_HOST")}  # not needed for help
    res = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and not res.stderr
    assert "--help" in res.stdout and "#" not in res.stdout.splitlines()[0]


@pytest.mark.parametrize("script", ["join.sh", "torchrun_single_node.sh"])
def test_launch_scripts_keep_relative_paths(script, tmp_path):
    """A launch script runs from where it is called: `--peers.key_file run.key` means ./run.key."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/sh\npwd\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    res = subprocess.run(["bash", str(REPO / "launch" / script), "--peers.key_file", "run.key"],
                         cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)}, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == str(tmp_path)
    assert lines[lines.index("--peers.key_file") + 1] == "run.key"
    if "--config" in lines:
        assert lines[lines.index("--config") + 1] == str(REPO / "configs" / "tiny.toml")
