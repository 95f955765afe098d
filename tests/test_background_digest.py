"""outer.digest = background: the global hash computed while the next inner steps run.

The same θ and momentum bits as hashing at the step; every state's digest is still
confirmed with the group, one outer step later (the sync record says which step it is of);
the thread hashes the state it was handed even when θ changes right after; what cannot run
it is refused before training.
"""

from __future__ import annotations

import json

import pytest
import torch

from dilo import DiLoCo
from dilo.comm.local import local_groups
from dilo.comm.protocol import DivergenceError
from dilo.config import parse_args
from tests.helpers import SMALL, Net, adamw, inner_step, run_workers, summaries, torchrun_cmd


def pair(mode: str, steps: int = 10, corrupt_after: int | None = None, **options) -> list:
    """Two in-process workers, H = 2 (or `options`' DiLoCo settings): per worker (θ, momentum,
    [(outer step, hash step, hash)], the final global_hash, whether the last digest was
    confirmed). `corrupt_after`: worker 1 flips one bit of θ right after that outer step returns."""
    groups, models = local_groups(2), [Net() for _ in range(2)]

    def worker(r):
        model, opt = models[r], adamw(models[r])
        d = DiLoCo(model, opt, group=groups[r], digest=mode, **{"inner_steps": 2, **options})
        stats = []
        try:
            for step in range(steps):
                inner_step(model, opt, r, step)
                s = d.step()
                if s is not None:
                    stats.append(s)
                    if r == 1 and s.outer_step == corrupt_after:
                        with d._state_lock:  # (waits for the digest thread, as every writer of θ does)
                            bits = d.fragments[0].theta.view(torch.int32)
                            bits[0] ^= 1
            stats += d.flush()
            pending = d.background_digest.pending if d.background_digest else None
            return (d.global_params.clone(), d.momentum().clone(),
                    [(s.outer_step, s.hash_step, s.global_hash) for s in stats], d.global_hash(),
                    pending is not None and pending.confirmed)
        finally:
            d.close()
    return run_workers(worker, 2)


def test_background_digest_gives_the_same_bits_and_every_hash_one_step_later():
    at_step, behind = pair("step"), pair("background")
    for r in range(2):
        assert torch.equal(at_step[r][0], behind[r][0]) and torch.equal(at_step[r][1], behind[r][1])
        assert at_step[r][3] == behind[r][3]  # the final state's hash
    records, late = at_step[0][2], behind[0][2]
    assert [(o, h) for o, h, _ in records] == [(o, o) for o in range(1, 6)]
    assert late[0] == (1, -1, "")
    assert [(o, h, d) for o, h, d in late[1:]] == [(o + 1, o, d) for o, _, d in records[:-1]]
    assert late == behind[1][2]
    assert behind[0][4] and behind[1][4]  # flush confirmed the last state's digest
    assert len({d for _, _, d in records}) == 5


@pytest.mark.parametrize("options", [
    {"overlap": "delayed", "outer_lr": 0.2},  # the checks queue behind the exchanges on their thread
    {"inner_steps": 4, "fragments": 2, "delay": 1},
])
def test_with_exchanges_in_the_background_too(options):
    at_step, behind = pair("step", steps=16, **options), pair("background", steps=16, **options)
    for r in range(2):
        assert torch.equal(at_step[r][0], behind[r][0]) and torch.equal(at_step[r][1], behind[r][1])
        assert at_step[r][3] == behind[r][3] and behind[r][4]
    records, late = at_step[0][2], behind[0][2]
    assert [(o, h, d) for o, h, d in late[1:]] == [(o + 1, o, d) for o, _, d in records[:-1]]


def test_the_thread_hashes_the_state_it_was_handed_and_a_divergence_is_caught_a_step_later():
    """Worker 1 changes θ right after outer step 2 (taking the state lock, as every writer does):
    state 2's digests still agree, state 3's differ, and the check at outer step 4 says so."""
    with pytest.raises(DivergenceError, match="outer step 3"):
        pair("background", corrupt_after=2)
    with pytest.raises(DivergenceError, match="outer step 3"):  # hashing at the step: caught at 3 too
        pair("step", corrupt_after=2)


def test_an_open_group_or_an_unknown_mode_is_refused():
    class Open(local_groups(1)[0].__class__):
        open_membership = True
    group = local_groups(1)[0]
    with pytest.raises(ValueError, match="outer.digest must be one of step, background"):
        DiLoCo(Net(), adamw(Net()), inner_steps=2, group=group, digest="later")
    group.__class__ = Open
    with pytest.raises(ValueError, match="needs a group of fixed members"):
        DiLoCo(Net(), adamw(Net()), inner_steps=2, group=group, digest="background")


@pytest.mark.parametrize("argv,needs", [
    (["--outer.digest", "later"], "outer.digest must be one of step, background"),
    (["--outer.digest", "background", "--comm.backend", "hivemind"],
     "outer.digest = background needs comm.backend = torch and run.failover = restart"),
    (["--outer.digest", "background", "--run.failover", "heal", "--run.workers", "2", "--comm.store",
      "127.0.0.1:29500"], "outer.digest = background needs comm.backend = torch and run.failover = restart"),
])
def test_config_refuses_what_cannot_confirm_a_step_later(argv, needs):
    with pytest.raises(ValueError, match=needs.replace(".", r"\.")):
        parse_args(argv)


@pytest.mark.e2e
def test_torchrun_with_background_digest_ends_on_the_same_state(procs, tmp_path):
    """Two workers under torchrun, 4 outer steps, each mode: the same final hash; the sync lines
    of the background run carry the step run's hashes one outer step later."""
    hashes = {}
    for mode in ("step", "background"):
        run = tmp_path / mode
        args = [*SMALL, "--run.dir", str(run), "--run.steps", "20", "--outer.inner_steps", "5",
                "--checkpoint.every", "0", "--outer.digest", mode]
        res = procs.run(torchrun_cmd(2, args), tmp_path / f"{mode}.txt")
        assert res.returncode == 0, res.stdout[-3000:]
        found = summaries(run)
        assert len(found) == 2 and found[0]["global_hash"] == found[1]["global_hash"]
        lines = [[r for r in map(json.loads, (run / f"metrics-{w}.jsonl").read_text().splitlines())
                  if r["kind"] == "sync"] for w in range(2)]
        assert [(r["hash_step"], r["global_hash"]) for r in lines[0]] == \
               [(r["hash_step"], r["global_hash"]) for r in lines[1]]
        hashes[mode] = (found[0]["global_hash"], [(r["hash_step"], r["global_hash"]) for r in lines[0]])
        if mode == "background":  # the sync lines say whose hash they print
            assert "hash - (none yet)" in res.stdout and f"hash {lines[0][1]['global_hash'][:12]} (of outer 1)" in res.stdout
    (final, records), (final_bg, late) = hashes["step"], hashes["background"]
    assert final == final_bg and [h for h, _ in records] == [1, 2, 3, 4]
    assert late == [(-1, "")] + records[:-1]
