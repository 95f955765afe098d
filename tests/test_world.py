"""Start-up refusals: one clean line (exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import SMALL, child_env


def test_unwritable_run_dir_is_one_line(tmp_path, monkeypatch, capsys):
    from dilo.train import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "a_file").write_text("")
    assert main([*SMALL, "--run.dir", str(tmp_path / "a_file" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.dir" in err and "not writable" in err


def test_missing_hivemind_extra_says_how_to_install(tmp_path):
    """Without hivemind importable, comm.backend = hivemind is refused with the pip command."""
    code = ("import sys; sys.modules['hivemind'] = None\n"  # `import hivemind` now fails
            "from dilo.train import main\n"
            f"sys.exit(main({[*SMALL, '--run.dir', str(tmp_path / 'run'), '--comm.backend', 'hivemind']!r}))")
    res = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "pip install -e '.[swarm]'" in res.stderr and "Traceback" not in res.stderr
