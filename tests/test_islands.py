"""Islands (run.worker_size > 1): DiLoCo workers made of several processes.

The maths is checked against a plain-torch reference: inside a worker the inner step
uses the mean gradient over the worker's ranks (what DDP computes), across workers the
DiLoCo update (mean pseudo-gradient, SGD Nesterov). Replicas: identical bytes on all 4
processes. Bytes: each rank's outer traffic is ~1/worker_size of a one-process worker's.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import sys
import time

import pytest
import torch
import torch.nn as nn

from dilo.codecs import get_codec
from dilo.comm.hierarchical import slice_ranks, worker_ranks
from dilo.comm.protocol import chunk_numel
from dilo.config import Config, parse_args, validate_world_size
from dilo.train import main as train_main
from tests import islands_worker as iw
from tests.helpers import Procs, SMALL, free_port, summaries, torchrun_cmd
from tools.proctree import children

NUM_WORKERS = 2
WORLD = NUM_WORKERS * iw.WORKER_SIZE


def test_worker_size_must_divide_the_world_size():
    cfg = Config()
    cfg.run.worker_size = 3
    with pytest.raises(ValueError) as e:
        validate_world_size(cfg, 4)
    msg = str(e.value)
    assert "run.worker_size = 3" in msg and "world size 4" in msg and "1, 2, 4" in msg
    cfg.run.worker_size = 2
    validate_world_size(cfg, 4)  # accepted
    with pytest.raises(ValueError, match="run.worker_size = 2 needs run.mode = diloco"):
        parse_args(["--run.mode", "ddp", "--run.worker_size", "2"])
    with pytest.raises(ValueError, match="run.worker_size must be >= 1"):
        parse_args(["--run.worker_size", "0"])


def test_cli_refuses_before_the_rendezvous(monkeypatch, capsys, tmp_path):
    """Under torchrun's environment (WORLD_SIZE=4) the refusal comes before any process
    group is created, so it needs no other process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc = train_main([*SMALL, "--run.dir", str(tmp_path), "--run.worker_size", "3"])
    assert rc == 2
    assert "run.worker_size = 3 does not divide the world size 4" in capsys.readouterr().err


def test_rank_layout():
    # 4 nodes x 8 GPUs, a worker per node: worker 1 is node 1, slice 3 is GPU 3 of every node
    assert worker_ranks(1, 8) == list(range(8, 16))
    assert slice_ranks(3, 8, 4) == [3, 11, 19, 27]
    assert sorted(r for s in range(8) for r in slice_ranks(s, 8, 4)) == list(range(32))


# -- the maths, against an independent reference ----------------------------------------
@functools.cache
def reference() -> list[torch.Tensor]:
    """θ after each round: per worker, AdamW on the mean gradient of its ranks' batches."""
    global_model = iw.make_model()
    outer = torch.optim.SGD(global_model.parameters(), lr=iw.OUTER_LR, momentum=iw.MOMENTUM,
                            nesterov=True)
    workers = [copy.deepcopy(global_model) for _ in range(NUM_WORKERS)]
    opts = [iw.adamw(m) for m in workers]
    history = []
    for r in range(iw.ROUNDS):
        deltas = []
        for w, (model, opt) in enumerate(zip(workers, opts)):
            model.load_state_dict(global_model.state_dict())
            for s in range(iw.H):
                grads = []
                for k in range(iw.WORKER_SIZE):
                    x, y = iw.batch(w, k, r * iw.H + s)
                    grads.append(torch.autograd.grad(nn.functional.mse_loss(model(x), y),
                                                     list(model.parameters())))
                for i, p in enumerate(model.parameters()):
                    p.grad = torch.stack([g[i] for g in grads]).mean(0)
                opt.step()
                opt.zero_grad()
            deltas.append([g.detach() - p.detach()
                           for g, p in zip(global_model.parameters(), model.parameters())])
        for i, g in enumerate(global_model.parameters()):
            g.grad = torch.stack([d[i] for d in deltas]).mean(0)
        outer.step()
        outer.zero_grad()
        history.append(torch.cat([p.detach().reshape(-1).clone() for p in global_model.parameters()]))
    return history


@pytest.fixture(scope="module")
def island_results(tmp_path_factory):
    """Run tests/islands_worker.py once as 4 processes; the tests below read its output."""
    out = tmp_path_factory.mktemp("islands")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "tests.islands_worker", str(out)]
    procs = Procs()
    try:
        res = procs.run(cmd, out / "log.txt", timeout=120)
        assert res.returncode == 0, res.stdout[-3000:]
    finally:
        procs.cleanup()
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.e2e
def test_layout_and_membership(island_results):
    assert [r["island"] for r in island_results] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    for r, res in enumerate(island_results):
        for name, _, _ in iw.RUNS:
            assert res[name]["group"] == (r // 2, 2)  # DiLoCo sees 2 members: the workers
            assert res[name]["peers"] == [2] * iw.ROUNDS
            assert res[name]["gathered"] == [0, 1, 2, 3]  # one entry per process, worker-major


@pytest.mark.e2e
def test_a_misbuilt_composition_is_refused_on_every_rank(island_results):
    for res in island_results:
        assert "every rank of the worker must have an inter group" in res["misbuilt"]
        assert "local ranks [0] of 2" in res["misbuilt"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["sliced_fp32", "leader_fp32"])
def test_update_equals_reference(island_results, name):
    expected = reference()
    start = torch.cat([p.detach().reshape(-1) for p in iw.make_model().parameters()])
    for r in range(iw.ROUNDS):  # the reference moves: the comparison is not vacuous
        assert (expected[r] - start).abs().max() > 1e-3
        start = expected[r]
    for res in island_results:
        for r in range(iw.ROUNDS):
            torch.testing.assert_close(res[name]["theta"][r], expected[r], atol=1e-6, rtol=0)


@pytest.mark.e2e
@pytest.mark.parametrize("name", [n for n, _, _ in iw.RUNS])
def test_global_state_bit_identical_on_all_ranks(island_results, name):
    first = island_results[0][name]
    for res in island_results:
        assert res[name]["hash"] == first["hash"] and len(set(first["hash"])) == iw.ROUNDS
        for r in range(iw.ROUNDS):
            assert torch.equal(res[name]["theta"][r], first["theta"][r])
            assert torch.equal(res[name]["model"][r], first["theta"][r])  # live model = θ


@pytest.mark.e2e
def test_int8_stays_near_the_reference(island_results):
    expected = reference()
    for r in range(iw.ROUNDS):
        theta = island_results[0]["sliced_int8"]["theta"][r]
        assert (theta - expected[r]).norm() / expected[r].norm() < 1e-2


@pytest.mark.e2e
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_each_rank_sends_a_worker_size_share(island_results, codec):
    numel = island_results[0]["sliced_fp32"]["theta"][0].numel()
    c = get_codec(codec, iw.BLOCK)
    slice_len = math.ceil(numel / iw.WORKER_SIZE)
    theory = 2 * (NUM_WORKERS - 1) * c.encoded_nbytes(chunk_numel(slice_len, NUM_WORKERS, c.block_size))
    for res in island_results:
        one_process = res["one_process_bytes"][codec]  # measured in the same run
        sent = res[f"sliced_{codec}"]["sent"]
        assert sent == [theory] * iw.ROUNDS == res[f"sliced_{codec}"]["received"]
        assert abs(sent[0] / one_process - 1 / iw.WORKER_SIZE) < 0.05
        assert res[f"sliced_{codec}"]["intra"] == [(iw.WORKER_SIZE - 1) * slice_len * 4] * iw.ROUNDS


@pytest.mark.e2e
def test_leader_mode_only_local_rank_0_uses_the_slow_links(island_results):
    for res in island_results:
        _, rank_in_worker, _ = res["island"]
        sent = res["leader_fp32"]["sent"]
        if rank_in_worker == 0:
            assert sent == [res["one_process_bytes"]["fp32"]] * iw.ROUNDS
        else:
            assert sent == [0] * iw.ROUNDS and res["leader_fp32"]["intra"][0] > 0


# -- the CLI end to end ---------------------------------------------------------------
def sync_hashes(path) -> list[str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["global_hash"] for r in records if r["kind"] == "sync"]


@pytest.mark.e2e
def test_train_two_workers_of_two_ranks(procs, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "10", "--outer.inner_steps", "5",
            "--run.worker_size", "2", "--checkpoint.every", "1"]
    res = procs.run(torchrun_cmd(WORLD, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert [s["worker"] for s in found] == [0, 1]  # one summary per worker, by its rank 0
    assert len({s["global_hash"] for s in found}) == 1
    per_rank = [sync_hashes(run / f"metrics-{n}.jsonl") for n in ("0", "0.1", "1", "1.1")]
    assert len(per_rank[0]) == 2 and all(h == per_rank[0] for h in per_rank)
    assert per_rank[0][-1] == found[0]["global_hash"]
    n = found[0]["synced_params"]
    c = get_codec("int8")
    per_sync = 2 * (NUM_WORKERS - 1) * c.encoded_nbytes(chunk_numel(math.ceil(n / 2), 2, c.block_size))
    for s in found:
        assert s["num_workers"] == 2 and s["worker_size"] == 2 and s["outer_steps"] == 2
        assert s["bytes_sent"] == 2 * per_sync and s["worker_bytes_sent"] == 2 * 2 * per_sync
        assert s["tokens"] == 10 * 2 * 4 * 32  # steps x worker_size x batch_size x seq_len
    ckpts = sorted(p.name for p in (run / "checkpoints" / "step-000002").iterdir())
    assert ckpts == ["worker-0.pt", "worker-1.pt"]


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_and_resume_with_islands_gives_the_uninterrupted_hash(procs, tmp_path):
    common = [*SMALL, "--run.steps", "60", "--outer.inner_steps", "5", "--run.worker_size", "2",
              "--checkpoint.every", "1", "--checkpoint.keep", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    res = procs.run(torchrun_cmd(WORLD, [*common, "--run.dir", str(ref)]), tmp_path / "ref.txt",
                    timeout=240)
    assert res.returncode == 0, res.stdout[-3000:]

    agent = procs.start(torchrun_cmd(WORLD, [*common, "--run.dir", str(cut)]), tmp_path / "cut1.txt")
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-000003" / "worker-1.pt").exists():
        assert time.time() < deadline and agent.poll() is None, "run ended before the kill"
        time.sleep(0.05)
    workers = children(agent.pid)
    assert len(workers) == WORLD, workers
    os.kill(workers[-1], signal.SIGKILL)  # rank 1 of worker 1: not a checkpoint writer
    assert agent.wait(timeout=60) != 0
    assert not summaries(cut), "the interrupted run finished before it was killed"

    res = procs.run(torchrun_cmd(WORLD, [*common, "--run.dir", str(cut), "--checkpoint.resume", "auto"]),
                    tmp_path / "cut2.txt", timeout=240)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout
    want = {s["global_hash"] for s in summaries(ref)}
    assert len(want) == 1 and {s["global_hash"] for s in summaries(cut)} == want
    assert [s["tokens"] for s in summaries(cut)] == [s["tokens"] for s in summaries(ref)]
