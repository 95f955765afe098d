"""Streaming + fp4 + error feedback + eager outer steps, end to end under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dilo.codecs import get_codec
from tests.helpers import SMALL, summaries, torchrun_cmd

WORKERS = 3
STREAMING = [*SMALL, "--model.n_layers", "2", "--run.steps", "24", "--outer.inner_steps", "6",
             "--outer.fragments", "2", "--outer.delay", "1", "--outer.overlap", "eager",
             "--comm.codec", "fp4", "--comm.error_feedback", "true",
             "--checkpoint.every", "3", "--checkpoint.keep", "10"]


def records(run_dir: Path, worker: int, kind: str) -> list[dict]:
    lines = (run_dir / f"metrics-{worker}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.e2e
def test_streaming_eager_fp4_workers_agree_and_learn(procs, tmp_path):
    run = tmp_path / "run"
    res = procs.run(torchrun_cmd(WORKERS, [*STREAMING, "--run.dir", str(run)]), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert [s["worker"] for s in found] == list(range(WORKERS))
    assert len({s["global_hash"] for s in found}) == 1
    syncs = [records(run, w, "sync") for w in range(WORKERS)]
    per_worker = [[(r["outer_step"], r["fragment"], r["global_hash"]) for r in s] for s in syncs]
    assert len(per_worker[0]) >= 8 and all(p == per_worker[0] for p in per_worker)
    assert {r["fragment"] for r in syncs[0]} == {0, 1}

    # learning: the loss falls well below the first steps' (ln 256 ≈ 5.5 for bytes)
    first = records(run, 0, "inner")[0]["loss"]
    assert all(s["final_eval_loss"] < first - 0.5 for s in found), (first, found[0]["final_eval_loss"])

    # one fragment on the wire at a time: the peak is a fragment's exchange, below a whole model's
    s = found[0]
    assert s["peak_sync_bytes"] == max(r["bytes_sent"] for r in syncs[0])
    chunk = math.ceil(math.ceil(s["synced_params"] / WORKERS) / 256) * 256
    whole_model = 2 * (WORKERS - 1) * get_codec("fp4").encoded_nbytes(chunk)
    assert s["peak_sync_bytes"] < whole_model
    assert s["bytes_sent"] == sum(r["bytes_sent"] for r in syncs[0])

    # hidden + exposed = the exchanges' time; eager keeps most of it off the critical path
    total = s["sync_seconds_hidden"] + s["sync_seconds_exposed"]
    assert math.isclose(total, s["sync_seconds"], rel_tol=1e-6) and s["sync_seconds_hidden"] > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_streaming_resume_from_a_mid_run_checkpoint_is_exact(procs, tmp_path):
    """The checkpoint at outer step 3 holds exchanges in flight; resuming from it reproduces
    the uninterrupted run's hash after every later outer step."""
    ref = tmp_path / "ref"
    res = procs.run(torchrun_cmd(WORKERS, [*STREAMING, "--run.dir", str(ref)]), tmp_path / "ref.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    mid = ref / "checkpoints" / "step-000003"
    assert (mid / "worker-0.pt").exists()
    again = tmp_path / "again"
    res = procs.run(torchrun_cmd(WORKERS, [*STREAMING, "--run.dir", str(again),
                                           "--checkpoint.resume", str(mid)]), tmp_path / "again.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout
    for w in range(WORKERS):
        want = [r["global_hash"] for r in records(ref, w, "sync") if r["outer_step"] > 3]
        got = [r["global_hash"] for r in records(again, w, "sync")]
        assert len(got) > 3 and got == want
    assert [s["global_hash"] for s in summaries(again)] == [s["global_hash"] for s in summaries(ref)]
