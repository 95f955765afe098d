"""Graceful stop, background checkpoints, and resuming into a changed world."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dilo import checkpoint
from dilo.comm.local import local_groups
from dilo.config import parse_args
from dilo.graceful_stop import GracefulStop
from dilo.train import Trainer
from tests.helpers import SMALL, run_workers, summaries, torchrun_cmd
from tools import proctree
from tools.proctree import children


def lines(run_dir: Path, worker: int, kind: str, event: str | None = None) -> list[dict]:
    path = run_dir / f"metrics-{worker}.jsonl"
    found = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    return [r for r in found if r["kind"] == kind and (event is None or r.get("event") == event)]


def rank_of(pid: int) -> int:
    return int(proctree.environ(pid)["RANK"])


def same_content(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_content, a, b))
    return a == b


def test_stop_flag_is_agreed_by_all_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when the suite runs in the background)
    stop = GracefulStop()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs on the main thread between bytecodes
        assert stop.requested and stop.signal_name == "SIGINT"
        groups = local_groups(3)
        stoppers = [stop, GracefulStop(), GracefulStop()]  # only member 0 got the signal
        assert run_workers(lambda r: stoppers[r].agreed(groups[r]), 3) == [True, True, True]
        calm = [GracefulStop() for _ in range(3)]
        assert run_workers(lambda r: calm[r].agreed(groups[r]), 3) == [False, False, False]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.e2e
def test_sigterm_to_one_rank_stops_all_at_one_outer_step_with_a_checkpoint(procs, tmp_path):
    run = tmp_path / "run"
    common = [*SMALL, "--run.dir", str(run), "--outer.inner_steps", "5", "--checkpoint.every", "0"]
    agent = procs.start(torchrun_cmd(2, [*common, "--run.steps", "2000"]), tmp_path / "a.txt")
    deadline = time.time() + 180
    while not lines(run, 1, "sync"):
        assert time.time() < deadline and agent.poll() is None, (tmp_path / "a.txt").read_text()[-3000:]
        time.sleep(0.1)
    worker_1 = next(p for p in children(agent.pid) if rank_of(p) == 1)
    os.kill(worker_1, signal.SIGTERM)  # rank 1 only: rank 0 must learn it at the outer boundary
    assert agent.wait(timeout=120) == 0, (tmp_path / "a.txt").read_text()[-3000:]
    stops = [lines(run, w, "event", "stop") for w in (0, 1)]
    assert len(stops[0]) == len(stops[1]) == 1
    outer = stops[0][0]["outer_step"]
    assert stops[1][0]["outer_step"] == outer and stops[1][0]["signal"] == "SIGTERM"
    assert stops[0][0]["signal"] == ""  # rank 0 got no signal: it stopped on rank 1's request
    # checkpoint.every = 0, yet the stop wrote one, for both workers, at the same outer step
    assert checkpoint.list_steps(run) == [outer]
    for w in (0, 1):
        state = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run, outer), w))
        assert state["outer_step"] == outer and state["step"] == 5 * outer and state["exact"]
    stopped = summaries(run)  # a graceful stop writes the summary, marked as stopped
    assert len(stopped) == 2 and all(x["stopped"] and x["outer_steps"] == outer for x in stopped)
    assert outer * 5 < 2000

    res = procs.run(torchrun_cmd(2, [*common, "--run.steps", str(5 * outer + 10),
                                     "--checkpoint.resume", "auto"]), tmp_path / "b.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"outer step {outer};" in res.stdout and "(exact:" in res.stdout
    found = summaries(run)
    assert len(found) == 2 and len({s["global_hash"] for s in found}) == 1
    assert found[0]["outer_steps"] == outer + 2


@pytest.mark.e2e
def test_sigterm_to_torchrun_ends_the_run_with_exit_0_and_summaries(procs, tmp_path):
    """dilo.torchrun: torchrun's agent re-raises the SIGTERM it forwarded (exit 1); the
    wrapper exits 0 when every worker stopped cleanly."""
    run = tmp_path / "run"
    cmd = torchrun_cmd(2, [*SMALL, "--run.dir", str(run), "--outer.inner_steps", "5",
                           "--checkpoint.every", "0", "--run.steps", "2000"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    cmd[2] = "dilo.torchrun"
    agent = procs.start(cmd, tmp_path / "a.txt")
    deadline = time.time() + 180
    while not (lines(run, 0, "sync") and lines(run, 1, "sync")):
        assert time.time() < deadline and agent.poll() is None, (tmp_path / "a.txt").read_text()[-3000:]
        time.sleep(0.1)
    agent.send_signal(signal.SIGTERM)  # the agent, as a scheduler would; it forwards it to both ranks
    assert agent.wait(timeout=120) == 0, (tmp_path / "a.txt").read_text()[-3000:]
    found = summaries(run)
    assert len(found) == 2 and all(x["stopped"] for x in found)
    assert len({x["global_hash"] for x in found}) == 1
    assert all(lines(run, w, "event", "stop")[0]["signal"] == "SIGTERM" for w in (0, 1))


def train_in_process(run_dir: Path, *args: str) -> dict:
    trainer = Trainer(parse_args([*SMALL, "--run.dir", str(run_dir), "--outer.inner_steps", "5",
                                  "--checkpoint.every", "1", "--checkpoint.keep", "10", *args]))
    try:
        return trainer.run()
    finally:
        trainer.close()


@pytest.mark.usefixtures("no_launch_env")
def test_async_checkpoint_has_the_sync_content_and_resumes_to_the_same_hash(tmp_path):
    sync = train_in_process(tmp_path / "sync", "--run.steps", "20")
    background = train_in_process(tmp_path / "async", "--run.steps", "20", "--checkpoint.async", "true")
    assert background["global_hash"] == sync["global_hash"]
    for step in (1, 2, 3, 4):
        a = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(tmp_path / "sync", step), 0))
        b = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(tmp_path / "async", step), 0))
        assert a.pop("config")["checkpoint"]["async_"] is False
        assert b.pop("config")["checkpoint"]["async_"] is True
        for key in ("sync_seconds", "sync_seconds_hidden", "sync_seconds_exposed", "outer_apply_seconds",
                    "digest_seconds"):  # wall time, not state
            a["totals"].pop(key), b["totals"].pop(key)
        assert same_content(a, b), f"outer step {step}: background checkpoint differs"
        assert a["diloco"]["inner_optimizer"]["state"], "the inner optimizer state was saved"
    events = lines(tmp_path / "async", 0, "event", "checkpoint")
    assert len(events) == 4 and all(e["background"] for e in events)
    resumed = train_in_process(tmp_path / "async", "--run.steps", "20", "--checkpoint.async", "true",
                               "--checkpoint.resume", str(checkpoint.step_dir(tmp_path / "async", 2)))
    assert resumed["global_hash"] == sync["global_hash"]


@pytest.mark.e2e
@pytest.mark.usefixtures("no_launch_env")
def test_grow_then_shrink_resumes_elastically(procs, tmp_path):
    run = tmp_path / "run"
    common = ["--checkpoint.keep", "2"]
    train_in_process(run, *common, "--run.steps", "20")  # one worker writes outer steps 1..4
    saved = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run, 4), 0))

    args = [*SMALL, "--run.dir", str(run), "--outer.inner_steps", "5", "--checkpoint.every", "1",
            *common, "--run.steps", "30", "--checkpoint.resume", "auto"]
    res = procs.run(torchrun_cmd(3, args), tmp_path / "grow.txt")  # grow 1 -> 3
    assert res.returncode == 0, res.stdout[-3000:]
    resumes = [lines(run, w, "event", "resume")[-1] for w in range(3)]
    assert {r["how"] for r in resumes} == {"elastic"} and {r["written_by"] for r in resumes} == {1}
    assert {r["global_hash"] for r in resumes} == {saved["global_hash"]}
    assert [r["inner_from"] for r in resumes] == [4, None, None]  # new slots: fresh AdamW
    grown = summaries(run)
    assert len(grown) == 3 and len({s["global_hash"] for s in grown}) == 1
    # the data position went on from the checkpoint: 2 rounds of 3 workers x 5 steps x 4 rows
    after = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run, 6), 2))
    assert after["data"]["position"] == saved["data"]["position"] + 2 * 3 * 5 * 4
    assert after["data"]["num_lanes"] == saved["data"]["num_lanes"] == 4

    final = train_in_process(run, *common, "--run.steps", "40", "--checkpoint.resume", "auto")
    shrink = lines(run, 0, "event", "resume")[-1]  # shrink 3 -> 1
    assert (shrink["how"], shrink["written_by"], shrink["workers"]) == ("elastic", 3, 1)
    assert shrink["global_hash"] == grown[0]["global_hash"] and shrink["outer_step"] == 6
    assert final["inner_steps"] == 40 and final["num_workers"] == 1
