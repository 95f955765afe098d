"""Resume: the plan, the state broadcast, and checkpoints killed mid-write."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time

import numpy as np
import torch

from dilo import atomic_write, checkpoint, resume
from dilo.comm.local import local_groups
from tests.helpers import run_workers


def f(step: int, worker: int, num_workers: int, exact: bool = True) -> dict:
    return {"step": step, "worker": worker, "num_workers": num_workers, "exact": exact,
            "dir": f"step-{step:06d}"}


def surveys_from(files: list[dict], world_size: int) -> list[list[dict]]:
    """Split files among ranks the way `survey` does: own slot, departed slots mod world size."""
    return [[x for x in files if x["worker"] % world_size == r and (x["worker"] == r or x["worker"] >= world_size)]
            for r in range(world_size)]


def plan(files: list[dict], world_size: int) -> resume.ResumePlan:
    return resume.plan_resume(surveys_from(files, world_size), world_size)


def test_plan_same_world_is_exact_at_newest_complete_step():
    files = [f(s, w, 2) for s in (3, 4) for w in (0, 1)]
    p = plan(files, 2)
    assert (p.kind, p.step, p.written_by) == ("exact", 4, 2)
    # a torn write of the next step (worker 1 killed while writing 5): rewind, stay exact
    p = plan(files + [f(5, 0, 2)], 2)
    assert (p.kind, p.step) == ("exact", 4)
    assert plan([], 2).kind == "fresh"


def test_plan_changed_world_is_elastic_from_newest_state():
    files = [f(s, w, 4) for s in (3, 4) for w in range(4)] + [f(5, 2, 4)]
    shrink = plan(files, 2)
    # newest state is step 5, held only by departed slot 2, which rank 0 verified (2 mod 2)
    assert (shrink.kind, shrink.step, shrink.source_worker, shrink.source_rank) == ("elastic", 5, 2, 0)
    assert shrink.written_by == 4
    grow = plan([f(7, w, 2) for w in (0, 1)], 3)
    assert (grow.kind, grow.step, grow.source_rank, grow.source_worker) == ("elastic", 7, 0, 0)


def test_plan_prefers_newer_failure_state_and_refuses_mixed_worlds():
    # regular files at 4; the survivors saved outer step 6 after a peer died: elastic from 6
    files = [f(4, w, 3) for w in range(3)] + [f(6, 0, 3, exact=False), f(6, 2, 3, exact=False)]
    p = plan(files, 3)
    assert (p.kind, p.step, p.source_worker) == ("elastic", 6, 0)
    # a 2-world wrote after the complete 3-world step 4: not a torn write of this world
    files = [f(4, w, 3) for w in range(3)] + [f(5, 0, 2)]
    assert plan(files, 3).kind == "elastic" and plan(files, 3).step == 5
    # a complete step that also holds a departed slot's file is from another world
    files = [f(4, w, 3) for w in range(3)]
    assert plan(files, 2) == resume.ResumePlan("elastic", 4, "step-000004", 0, 0, 3)


def test_broadcast_global_state_gives_every_member_the_source_state():
    big = torch.randn(10_000)
    state = {"fingerprint": "x", "step": 7, "worker": 1, "rng": {"python": (1, 2)},
             "data": {"position": 96}, "global_hash": "h",
             "diloco": {"global_params": big, "inner_optimizer": {"secret": 1}, "outer_step": 3,
                        "outer_optimizer": {"state": {0: {"momentum_buffer": big * 2}},
                                            "param_groups": [{"lr": 0.7, "params": [0]}]}},
             "model_rest": {"small": torch.arange(3.0)}}
    groups = local_groups(3)
    got = run_workers(lambda r: resume.broadcast_global_state(groups[r], state if r == 1 else None, 1), 3)
    for shared in got:
        assert set(shared) == {"fingerprint", "step", "data", "global_hash", "diloco", "model_rest"}
        assert torch.equal(shared["diloco"]["global_params"], big)
        assert torch.equal(shared["diloco"]["outer_optimizer"]["state"][0]["momentum_buffer"], big * 2)
        assert "inner_optimizer" not in shared["diloco"]
        assert torch.equal(shared["model_rest"]["small"], torch.arange(3.0))
        assert shared["step"] == 7 and shared["data"] == {"position": 96}
    own = {"totals": {"syncs": 5}, "rng": "r", "diloco": {"inner_optimizer": {"mine": 1}}}
    merged = resume.merge(got[0], own)
    assert merged["diloco"]["inner_optimizer"] == {"mine": 1} and merged["totals"] == {"syncs": 5}
    fresh = resume.merge(got[2], None)
    assert fresh["diloco"]["inner_optimizer"] is None and fresh["rng"] is None


# --- a worker killed while writing a large checkpoint ----------------------------------

PAYLOAD = 1_000_000  # 4 MB of fp32 per file


def _writer(run_dir: str, seed: int) -> None:
    """Two workers' checkpoints, step after step, with a slow disk (fsync takes 30 ms)."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.03)
        real_fsync(fd)

    atomic_write.os.fsync = slow_fsync  # this forked child only
    # numpy, not torch ops: torch's thread pool may not survive fork()
    base = np.random.default_rng(seed).standard_normal(PAYLOAD, dtype=np.float32)
    for step in range(1, 10_000):
        for worker in (0, 1):
            state = {"outer_step": step, "num_workers": 2, "exact": True, "worker": worker,
                     "payload": torch.from_numpy(base + np.float32(step))}
            checkpoint.save(run_dir, worker, step, state, keep=2, num_workers=2)


def test_kill_during_checkpoint_write_leaves_only_complete_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(5)
    run_dir = tmp_path / "run"
    base = np.random.default_rng(1).standard_normal(PAYLOAD, dtype=np.float32)
    torn = 0
    # At least 6 kills, and more (up to 20) until two of them landed inside a write: on a
    # loaded machine the share of time spent writing varies, the property checked does not.
    for trial in range(20):
        if trial >= 6 and torn >= 2:
            break
        child = ctx.Process(target=_writer, args=(str(run_dir), 1), daemon=True)
        child.start()
        try:
            first = checkpoint.worker_file(checkpoint.step_dir(run_dir, 2), 1)
            deadline = time.monotonic() + 60
            while not first.exists():  # two complete steps first, then a kill at a random time
                assert time.monotonic() < deadline and child.is_alive(), "writer made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        torn += bool(list(run_dir.glob("checkpoints/*/.worker-*.tmp")))
        steps = checkpoint.list_steps(run_dir)
        complete = [s for s in steps
                    if all(checkpoint.worker_file(checkpoint.step_dir(run_dir, s), w).exists() for w in (0, 1))]
        any_file = [s for s in steps if list(checkpoint.step_dir(run_dir, s).glob("worker-*.pt"))]
        # every file under a final name is whole: magic, length, checksum and content
        for path in run_dir.glob("checkpoints/*/worker-*.pt"):
            state = checkpoint.read_verified(path)
            assert np.array_equal(state["payload"].numpy(), base + np.float32(state["outer_step"]))
        dirs = [checkpoint.step_dir(run_dir, s) for s in steps]
        same = resume.plan_resume([resume.survey(dirs, r, 2) for r in range(2)], 2)
        if complete:  # the same world resumes exactly from the newest step both workers finished
            assert (same.kind, same.step) == ("exact", max(complete))
        else:  # killed during the very first checkpoint
            assert (same.kind, same.step) == ("elastic", max(any_file)) if any_file else same.kind == "fresh"
        for world in (1, 3):  # a changed world takes the newest state there is
            p = resume.plan_resume([resume.survey(dirs, r, world) for r in range(world)], world)
            assert (p.kind, p.step) == ("elastic", max(any_file))
        shutil.rmtree(checkpoint.checkpoint_root(run_dir))
    assert torn >= 2, "no kill landed inside a write; the test did not test anything"
