"""Sharded workers (run.shard = fsdp, dilo/sharded_state.py, dilo/shard_checkpoint.py).

In-process: the outer step on chunks (each rank's dim-0 chunk of every parameter, FSDP2's
cut) gives exactly the bytes of the outer step on whole vectors (fp32 codec), both near an
independent Nesterov reference; re-sharding assembles and re-cuts exactly; a step with a
corrupt or missing shard is passed over. End to end (torchrun, 2 workers x 2 ranks): the
sharded island's eval loss is within 1% of the DDP island's, every rank of every worker
logs the same global hash, each rank holds half the outer state, and `resume auto` from a
mid-run checkpoint ends on the uninterrupted run's hash.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from dilo import checkpoint
from dilo.comm.local import local_groups
from dilo.config import parse_args
from dilo.diloco import DiLoCo
from dilo.shard_checkpoint import (
    complete_step,
    manifest_file,
    refuse_unsharded_resume,
    reshard,
    shard_file,
    split_flat,
)
from dilo.sharded_state import LocalShards, local_chunk
from tests.helpers import SMALL, Procs, run_workers, summaries, torchrun_cmd

SHAPES = [(7, 5), (5,), (3, 4), (1, 6)]  # (1, 6): rank 1's chunk is empty, as FSDP2 cuts it
W, S, ROUNDS, LR, MU = 2, 2, 3, 0.7, 0.9


class Params(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(t.clone()) for t in tensors)


def trained(w: int, rnd: int) -> list[torch.Tensor]:
    """Worker w's inner progress in round rnd (a fixed perturbation per worker and round)."""
    g = torch.Generator().manual_seed(100 * w + rnd)
    return [0.05 * torch.randn(s, generator=g) for s in SHAPES]


def run_diloco(make_model, groups, chunk) -> list:
    """θ after each round for each member; `chunk(list of full tensors)` is what it holds."""
    def member(i):
        w = i % W
        model = make_model(i)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        d = DiLoCo(model, opt, inner_steps=1, outer_lr=LR, outer_momentum=MU, codec="fp32", group=groups[i])
        out = []
        for rnd in range(ROUNDS):
            with torch.no_grad():
                for p, step in zip(model.parameters(), chunk(i, trained(w, rnd))):
                    p.add_(step)
            d.step()
            out.append(d.global_params.clone())
        return out
    return run_workers(member, len(groups))


def test_sharded_outer_step_is_the_whole_outer_step_in_chunks():
    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    whole = run_diloco(lambda i: Params(start), local_groups(W), lambda i, ts: ts)
    # member i = (rank r, worker w): slice group r holds local rank r of every worker
    slice_groups = [g for _ in range(S) for g in local_groups(W)]
    pieces = run_diloco(lambda i: LocalShards(Params([local_chunk(t, S, i // W) for t in start])),
                        slice_groups, lambda i, ts: [local_chunk(t, S, i // W) for t in ts])
    # independent reference: mean Δ, SGD Nesterov (v ← μv + Δ; θ ← θ − lr(Δ + μv))
    theta, v = torch.cat([t.reshape(-1) for t in start]), None
    for rnd in range(ROUNDS):
        delta = torch.stack([-torch.cat([t.reshape(-1) for t in trained(w, rnd)]) for w in range(W)]).mean(0)
        v = delta.clone() if v is None else MU * v + delta
        theta = theta - LR * (delta + MU * v)
        for w in range(W):
            torch.testing.assert_close(whole[w][rnd], theta, atol=1e-6, rtol=0)
            per_rank = [split_flat(pieces[r * W + w][rnd], [list(local_chunk(torch.empty(s), S, r).shape)
                                                            for s in SHAPES]) for r in range(S)]
            joined = torch.cat([torch.cat([per_rank[r][i] for r in range(S)]).reshape(-1)
                                for i in range(len(SHAPES))])
            assert torch.equal(joined, whole[w][rnd])  # the same bytes, reassembled


@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (2, 1), (4, 2)])
def test_reshard_is_exact(old, new):
    full = [torch.randn(s) for s in SHAPES]
    shapes = [list(s) for s in SHAPES]
    pieces = [[local_chunk(t, old, r).reshape(-1) for t in full] for r in range(old)]
    for r in range(new):
        want = torch.cat([local_chunk(t, new, r).reshape(-1) for t in full])
        assert torch.equal(reshard(pieces, shapes, new, r), want)


@pytest.mark.parametrize("argv,needs", [
    (["--run.shard", "fsdp"], "run.worker_size >= 2"),
    (["--run.shard", "fsdp", "--run.worker_size", "2", "--run.mode", "ddp"], "run.mode = diloco"),
    (["--run.shard", "fsdp", "--run.worker_size", "2", "--outer.overlap", "eager"], "outer.overlap"),
    (["--run.shard", "fsdp", "--run.worker_size", "2", "--comm.backend", "hivemind"], "comm.backend"),
    (["--run.shard", "zero3"], "run.shard must be one of ddp, fsdp"),
])
def test_refused_combinations_say_what_to_change(argv, needs):
    with pytest.raises(ValueError, match=needs.replace(".", r"\.").replace("(", r"\(")):
        parse_args(argv)


def sync_hashes(path) -> list[str]:
    return [r["global_hash"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "sync"]


COMMON = [*SMALL, "--run.steps", "10", "--outer.inner_steps", "5", "--run.worker_size", "2",
          "--checkpoint.every", "1", "--checkpoint.keep", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 workers x 2 ranks, sharded and DDP, run once; the tests below read them."""
    out = tmp_path_factory.mktemp("shard")
    procs = Procs()
    try:
        for shard in ("fsdp", "ddp"):
            res = procs.run(torchrun_cmd(4, [*COMMON, "--run.shard", shard, "--run.dir", str(out / shard)]),
                            out / f"{shard}.txt", timeout=180)
            assert res.returncode == 0, res.stdout[-3000:]
    finally:
        procs.cleanup()
    return out


@pytest.mark.e2e
def test_sharded_island_matches_the_ddp_island(runs):
    fsdp, ddp = summaries(runs / "fsdp"), summaries(runs / "ddp")
    assert len(fsdp) == 2 and all(s["shard"] == "fsdp" and s["outer_steps"] == 2 for s in fsdp)
    assert abs(fsdp[0]["final_eval_loss"] / ddp[0]["final_eval_loss"] - 1) < 0.01
    per_rank = [sync_hashes(runs / "fsdp" / f"metrics-{n}.jsonl") for n in ("0", "0.1", "1", "1.1")]
    assert len(per_rank[0]) == 2 and len(set(per_rank[0])) == 2 and all(h == per_rank[0] for h in per_rank)
    assert per_rank[0][-1] == fsdp[0]["global_hash"] == fsdp[1]["global_hash"]
    assert fsdp[0]["bytes_sent"] == ddp[0]["bytes_sent"]  # each rank exchanges half the vector
    # θ + momentum per rank: half the DDP island's (chunks of a tied-weight model, within a row)
    assert abs(fsdp[0]["outer_state_bytes"] / ddp[0]["outer_state_bytes"] - 0.5) < 0.01
    step = runs / "fsdp" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step.iterdir()) == [
        "worker-0.shard-0-of-2.pt", "worker-0.shard-1-of-2.pt", "worker-0.shards.pt",
        "worker-1.shard-0-of-2.pt", "worker-1.shard-1-of-2.pt", "worker-1.shards.pt"]


@pytest.mark.e2e
def test_a_step_with_a_corrupt_or_missing_shard_is_passed_over(runs, tmp_path):
    step = tmp_path / "step-000002"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step-000002", step)
    manifest, files = complete_step(step)
    assert manifest["worker_size"] == 2 and manifest["num_workers"] == 2 and len(files) == 4
    path = shard_file(step, 1, 1, 2)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in complete_step(step)
    path.unlink()
    assert "cannot read" in complete_step(step)
    manifest_file(step, 0).unlink()
    assert isinstance(complete_step(step), str)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_verified(manifest_file(step, 0))


@pytest.mark.e2e
def test_a_ddp_run_refuses_to_resume_over_sharded_checkpoints(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="resume them with --run.shard fsdp"):
        refuse_unsharded_resume(str(tmp_path))
    refuse_unsharded_resume(str(runs / "ddp"))  # one file per worker: nothing to refuse


@pytest.mark.e2e
def test_resume_from_a_mid_run_checkpoint_is_exact(runs, tmp_path):
    """The files of outer step 1 (as a run stopped there leaves them) resumed: the same end, with
    the resumed run hashing in the background (outer.digest: each rank's chunk on its digest
    thread, the worker's ranks gathering the digests one outer step later)."""
    cut = tmp_path / "cut"
    shutil.copytree(runs / "fsdp" / "checkpoints", cut / "checkpoints")
    shutil.rmtree(cut / "checkpoints" / "step-000002")
    procs = Procs()
    try:
        res = procs.run(torchrun_cmd(4, [*COMMON, "--run.shard", "fsdp", "--run.dir", str(cut),
                                         "--checkpoint.resume", "auto", "--outer.digest", "background"]),
                        tmp_path / "log.txt", timeout=180)
    finally:
        procs.cleanup()
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed (exact) at inner step 5, outer step 1" in res.stdout
    assert [s["global_hash"] for s in summaries(cut)] == [s["global_hash"] for s in summaries(runs / "fsdp")]
    assert [s["final_eval_loss"] for s in summaries(cut)] == [s["final_eval_loss"] for s in summaries(runs / "fsdp")]
    for n in ("0", "0.1", "1", "1.1"):  # the resumed run's one step: nothing hashed before it here
        syncs = [r for r in map(json.loads, (cut / f"metrics-{n}.jsonl").read_text().splitlines())
                 if r["kind"] == "sync"]
        assert [(r["outer_step"], r["hash_step"], r["global_hash"]) for r in syncs] == [(2, -1, "")]


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_with_another_worker_size_reshards_exactly(runs, tmp_path):
    """The final checkpoint of 2 x 2 resumed as 1 worker x 4 ranks: the same θ (eval loss bits)."""
    cut = tmp_path / "cut"
    shutil.copytree(runs / "fsdp" / "checkpoints", cut / "checkpoints")
    args = [*COMMON, "--run.shard", "fsdp", "--run.dir", str(cut), "--checkpoint.resume", "auto"]
    args[args.index("--run.worker_size") + 1] = "4"
    procs = Procs()
    try:
        res = procs.run(torchrun_cmd(4, args), tmp_path / "log.txt", timeout=180)
    finally:
        procs.cleanup()
    assert res.returncode == 0, res.stdout[-3000:]
    assert "re-sharded the checkpoint of outer step 2 written by 2 workers x 2 ranks for 1 workers x 4" in res.stdout
    assert summaries(cut)[0]["final_eval_loss"] == summaries(runs / "fsdp")[0]["final_eval_loss"]
