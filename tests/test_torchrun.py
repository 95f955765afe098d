"""Real multi-process runs under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from dilo.codecs import get_codec
from tests.helpers import SMALL, summaries, torchrun_cmd
from tools.proctree import children


def sync_lines(run_dir: Path, worker: int) -> list[dict]:
    lines = (run_dir / f"metrics-{worker}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "sync"]


@pytest.mark.e2e
def test_three_workers_int8(procs, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "20", "--outer.inner_steps", "5",
            "--comm.codec", "int8", "--checkpoint.every", "2"]
    res = procs.run(torchrun_cmd(3, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert [s["worker"] for s in found] == [0, 1, 2]
    assert len({s["global_hash"] for s in found}) == 1
    for s in found:
        assert s["outer_steps"] == 4 and s["inner_steps"] == 20
        assert math.isfinite(s["final_eval_loss"])
    # every sync's hash agrees across workers, not just the last one
    per_worker = [[r["global_hash"] for r in sync_lines(run, w)] for w in range(3)]
    assert len(per_worker[0]) == 4 and per_worker[0] == per_worker[1] == per_worker[2]
    # bytes: 4 syncs of the two-phase exchange, owner chunks of whole 256-element blocks
    n = found[0]["synced_params"]
    chunk = math.ceil(math.ceil(n / 3) / 256) * 256
    theory = 4 * 2 * 2 * get_codec("int8").encoded_nbytes(chunk)
    assert all(s["bytes_sent"] == theory == s["bytes_received"] for s in found)
    assert (run / "checkpoints" / "step-000004" / "worker-2.pt").exists()


@pytest.mark.e2e
def test_ddp_baseline(procs, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "10", "--outer.inner_steps", "5",
            "--run.mode", "ddp"]
    res = procs.run(torchrun_cmd(2, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert len(found) == 2 and found[0]["global_hash"] == found[1]["global_hash"]
    assert found[0]["bytes_are_estimated"] and found[0]["bytes_sent"] > 0


@pytest.mark.e2e
def test_sigkill_and_resume_gives_the_uninterrupted_hash(procs, tmp_path):
    # on_failure off: a survivor's save-after-failure file (non-exact, newer) would make
    # resume auto take the elastic path, which trades exactness for less recomputation.
    common = [*SMALL, "--run.steps", "120", "--outer.inner_steps", "5", "--comm.codec", "int8",
              "--checkpoint.every", "1", "--checkpoint.keep", "2", "--checkpoint.on_failure", "false"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    res = procs.run(torchrun_cmd(2, [*common, "--run.dir", str(ref)]), tmp_path / "ref.txt")
    assert res.returncode == 0, res.stdout[-3000:]

    agent = procs.start(torchrun_cmd(2, [*common, "--run.dir", str(cut)]), tmp_path / "cut1.txt")
    deadline = time.time() + 120
    # any step >= 4: with checkpoint.keep 2 a given step's file lives only a few outer steps
    while not any(int(p.parent.name.split("-")[1]) >= 4 for p in (cut / "checkpoints").glob("step-*/worker-1.pt")):
        assert time.time() < deadline and agent.poll() is None, "run ended before the kill"
        time.sleep(0.05)
    workers = children(agent.pid)
    assert workers, "no worker processes found under torchrun"
    os.kill(workers[-1], signal.SIGKILL)
    assert agent.wait(timeout=60) != 0
    assert not summaries(cut), "the interrupted run finished before it was killed"

    res = procs.run(torchrun_cmd(2, [*common, "--run.dir", str(cut), "--checkpoint.resume", "auto"]),
                    tmp_path / "cut2.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout
    want = {s["global_hash"] for s in summaries(ref)}
    got = {s["global_hash"] for s in summaries(cut)}
    assert len(want) == 1 and got == want
    assert [s["tokens"] for s in summaries(cut)] == [s["tokens"] for s in summaries(ref)]
