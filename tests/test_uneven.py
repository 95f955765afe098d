"""Uneven workers (issue 16, part 1): weighted contributions, rounds by time or tokens.

The weighted mean is checked against a reference written here (fp64, straight from the
definition in docs/uneven.md), not against dilo's own code.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from dilo.aggregate import Aggregate
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from dilo.comm.protocol import RoundReport
from dilo.config import parse_args
from dilo.config_checks import parse_slowdown
from dilo.diloco import DiLoCo
from dilo.rounds import RoundClock, Slowdown
from dilo.stats import RunTotals
from tests.helpers import Net, SMALL, adamw, inner_step, run_workers, summaries, swarm_trio, torchrun_cmd

TOKENS = [100.0, 300.0, 50.0]


def exchange(vectors, codec, aggregate, reports):
    """Every member's ExchangeResult of one exchange among len(vectors) in-process members."""
    groups = local_groups(len(vectors))
    return run_workers(lambda r: groups[r].average(vectors[r], codec, aggregate=aggregate, report=reports[r]),
                       len(vectors))


def reference_weighted_mean(vectors, tokens):
    """Σ w_i v_i / Σ w_i in fp64 (docs/uneven.md)."""
    total = sum(w * v.double() for w, v in zip(tokens, vectors))
    return total / sum(tokens)


@pytest.mark.parametrize("codec_name", ["fp32", "int8"])
def test_weighted_mean_matches_the_reference(codec_name):
    torch.manual_seed(0)
    codec = get_codec(codec_name, 64)
    vectors = [torch.randn(1000) * (i + 1) for i in range(3)]
    reports = [RoundReport(w, w / 10, 0.0) for w in TOKENS]
    results = exchange(vectors, codec, Aggregate(weighting="tokens"), reports)
    if codec.lossless:
        expected = reference_weighted_mean(vectors, TOKENS)
        assert torch.allclose(results[0].average.double(), expected, rtol=1e-6, atol=1e-6)
    else:  # each contribution crosses the wire once, the owner's mean once more
        sent = [codec.decode(codec.encode(v), v.numel()) for v in vectors]
        expected = reference_weighted_mean(sent, TOKENS).float()
        err = (results[0].average - expected).abs()
        assert (err <= codec.error_bound(expected) * 1.001 + 1e-6).all()
    # every member holds the same bytes, and learns every member's report
    assert all(torch.equal(results[0].average, r.average) for r in results)
    assert all(r.reports == [(w, w / 10, 0.0) for w in TOKENS] for r in results)
    # the unweighted mean is something else: the weights did act
    plain = exchange(vectors, codec, Aggregate(), [None] * 3)[0].average
    assert not torch.allclose(plain, results[0].average, atol=1e-3)


def test_equal_tokens_give_the_bytes_of_the_mean():
    torch.manual_seed(1)
    codec = get_codec("int8", 64)
    vectors = [torch.randn(777) for _ in range(3)]
    weighted = exchange(vectors, codec, Aggregate(weighting="tokens"), [RoundReport(512.0, 4.0)] * 3)
    plain = exchange(vectors, codec, Aggregate(), [None] * 3)
    assert torch.equal(weighted[0].average, plain[0].average)
    # the reports cost 24 bytes per phase-1 slice that leaves the member
    assert weighted[0].bytes_sent == plain[0].bytes_sent + 2 * RoundReport.NBYTES


def test_a_member_that_reports_no_tokens_is_dropped():
    vectors = [torch.full((64,), float(i + 1)) for i in range(3)]
    reports = [RoundReport(10.0, 1.0), RoundReport(0.0, 0.0), RoundReport(30.0, 3.0)]
    res = exchange(vectors, get_codec("fp32"), Aggregate(weighting="tokens"), reports)[0]
    assert torch.allclose(res.average, torch.full((64,), (10 * 1 + 30 * 3) / 40.0))
    assert res.dropped == 1 and res.rejected == [(1, "no tokens in the round")]


def test_clip_with_weights_scales_by_both():
    """clip's factor and the token weight multiply (a Δ twice the median norm with r = 1 is halved)."""
    vectors = [torch.full((64,), 1.0), torch.full((64,), 1.0), torch.full((64,), 4.0)]
    reports = [RoundReport(w, 1.0) for w in (1.0, 1.0, 2.0)]
    res = exchange(vectors, get_codec("fp32"), Aggregate("clip", clip_ratio=1.0, weighting="tokens"), reports)[0]
    # norms 8, 8, 32; median 8 -> c = (1, 1, 1/4); weights w / mean(w) = (0.75, 0.75, 1.5)
    expected = (0.75 * 1 + 0.75 * 1 + 1.5 * 0.25 * 4) / 3.0
    assert torch.allclose(res.average, torch.full((64,), expected))


def test_replicas_stay_bit_identical_with_unequal_rounds():
    """Rounds ended by the caller (inner_steps = 0), worker w takes 2·(w + 1) steps per round,
    int8 with error feedback, weights by tokens: one global state everywhere, every outer step."""
    groups = local_groups(3)

    def worker(rank: int):
        model = Net()
        opt = adamw(model)
        d = DiLoCo(model, opt, inner_steps=0, group=groups[rank], codec="int8", block_size=32,
                   error_feedback=True, weighting="tokens")
        hashes, weights, step = [], [], 0
        for _ in range(4):
            n = 2 * (rank + 1)
            for i in range(n):
                inner_step(model, opt, rank, step)
                step += 1
                stats = d.step(end_round=i == n - 1, report=RoundReport(16.0 * (i + 1), i + 1.0, 0.1 * (i + 1)))
            hashes.append(stats.global_hash)
            weights.append((stats.weight, stats.round_steps, stats.group_steps))
            assert stats.round_tokens == 16.0 * n
        d.close()
        return hashes, weights, torch.cat([p.detach().flatten() for p in model.parameters()])

    results = run_workers(worker, 3)
    assert results[0][0] == results[1][0] == results[2][0]
    assert all(torch.equal(results[0][2], r[2]) for r in results)
    for rank, (_, weights, _) in enumerate(results):
        for share, steps, group in weights:
            assert steps == 2 * (rank + 1) and group == 12
            assert share == pytest.approx((rank + 1) / 6)


def test_diloco_weights_by_steps_without_a_report():
    groups = local_groups(2)

    def worker(rank: int):
        model = Net()
        opt = adamw(model)
        d = DiLoCo(model, opt, inner_steps=3, group=groups[rank], codec="fp32", weighting="tokens")
        for step in range(3):
            inner_step(model, opt, rank, step)
            stats = d.step()
        d.close()
        return stats

    stats = run_workers(worker, 2)
    assert [s.round_tokens for s in stats] == [3.0, 3.0] and stats[0].weight == 0.5


def test_a_swarm_exchange_carries_the_reports_and_weights_alike():
    """The hivemind backend's exchange (in-process peers, no training): the same weighted bytes
    as the in-process backend, and every peer learns every report."""
    pytest.importorskip("hivemind")
    from dilo.comm.swarm_exchange import average_in_group

    torch.manual_seed(2)
    codec, rule = get_codec("int8", 64), Aggregate(weighting="tokens")
    vectors = [torch.randn(1000) for _ in range(3)]
    reports = [RoundReport(w, w / 10, 0.0) for w in TOKENS]
    with swarm_trio() as (peers, groups):
        results = run_workers(lambda i: average_in_group(peers[i].node, groups[i], vectors[i], codec, 30.0,
                                                         pytest.fail, rule, reports[i]), 3, timeout=90)
    local = exchange(vectors, codec, rule, reports)
    for r in results:
        assert torch.equal(r.average, local[0].average)
        assert r.reports == [(w, w / 10, 0.0) for w in TOKENS]
        assert r.owner_error is None  # made only when comm.owner_feedback asks (SwarmGroup passes it)


@pytest.mark.parametrize("args, needle", [
    (["--outer.sync_every_seconds", "5"], "exactly one of outer.inner_steps"),
    (["--outer.inner_steps", "0"], "outer.inner_steps (H) must be >= 1"),
    (["--outer.inner_steps", "0", "--outer.sync_every_seconds", "5", "--outer.target_tokens", "9"],
     "exactly one of"),
    (["--outer.inner_steps", "0", "--outer.sync_every_seconds", "5", "--outer.fragments", "2"],
     "needs outer.fragments = 1"),
    (["--outer.inner_steps", "0", "--outer.target_tokens", "5000", "--outer.overlap", "delayed"],
     "outer.overlap = none"),
    (["--outer.inner_steps", "0", "--outer.sync_every_seconds", "5", "--comm.backend", "hivemind"],
     "not available with comm.backend = hivemind"),
    (["--outer.inner_steps", "0", "--outer.sync_every_seconds", "5", "--run.worker_size", "2"],
     "needs run.worker_size = 1"),
    (["--outer.inner_steps", "0", "--outer.sync_every_seconds", "5", "--run.mode", "ddp"],
     "needs run.mode = diloco"),
    (["--outer.sync_every_seconds", "-1"], "outer.sync_every_seconds must be >= 0"),
    (["--outer.weighting", "size"], "outer.weighting must be one of equal, tokens"),
    (["--outer.weighting", "tokens", "--outer.aggregate", "median"], "needs outer.aggregate = mean or clip"),
    (["--outer.weighting", "tokens", "--comm.backend", "hivemind"], "auto with comm.backend = hivemind"),
    (["--outer.weighting", "tokens", "--run.mode", "ddp"], "outer.weighting only apply"),
    (["--run.slowdown", "1-2"], "run.slowdown: '1-2' must look like worker:factor"),
    (["--run.slowdown", "1:0.5"], "a factor >= 1"),
])
def test_config_refusals(args, needle):
    with pytest.raises(ValueError) as e:
        parse_args(args)
    assert needle in str(e.value)


def test_config_accepts_each_way_to_end_a_round():
    for extra in (["--outer.sync_every_seconds", "2.5"], ["--outer.target_tokens", "65536"]):
        cfg = parse_args(["--outer.inner_steps", "0", "--outer.weighting", "tokens", *extra])
        assert cfg.outer.inner_steps == 0 and cfg.outer.weighting == "tokens"
    assert parse_slowdown("1:2, 3:1.5") == {1: 2.0, 3: 1.5}


def test_the_time_clock_stops_before_a_step_that_would_overrun(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dilo.rounds.time.perf_counter", lambda: now[0])
    cfg = parse_args(["--outer.inner_steps", "0", "--outer.sync_every_seconds", "1.0"])
    clock = RoundClock(cfg, None, RunTotals())
    clock.begin()
    assert clock.due() is False  # at least one step per round
    steps = 0
    while True:
        now[0] += 0.3
        clock.count(0.3)
        steps += 1
        if clock.due():
            break
    assert steps == 3  # 0.9 s done; a fourth step would end at 1.2 s > 1.0 s
    report = clock.report()
    assert (report.steps, report.ready_seconds) == (3.0, pytest.approx(0.9))
    assert report.tokens == 3 * cfg.data.batch_size * cfg.model.seq_len
    assert clock.lr_step(12345) == 3  # the group's progress (0) plus this round's steps


def test_token_rounds_close_on_every_worker_at_one_poll():
    cfg = parse_args(["--outer.inner_steps", "0", "--outer.target_tokens", "4096",
                      "--data.batch_size", "2", "--model.seq_len", "32"])  # 64 tokens per step
    groups = local_groups(2, timeout_s=30)

    def worker(rank: int):
        clock = RoundClock(cfg, groups[rank], RunTotals())
        clock.begin(first=True)
        while not clock.due():
            time.sleep(0.002 * (rank + 1))  # worker 1 at half speed
            clock.count(0.002 * (rank + 1))
        return clock.tokens

    tokens = run_workers(worker, 2, timeout=60)
    assert sum(tokens) >= 4096 and tokens[0] > tokens[1]


def test_slowdown_sleeps_in_proportion():
    slow, fast = Slowdown("1:3", 1), Slowdown("1:3", 0)
    start = time.perf_counter()
    fast.after_step(0.05)
    assert time.perf_counter() - start < 0.05
    slow.after_step(0.05)
    assert time.perf_counter() - start >= 0.1


@pytest.mark.e2e
def test_time_rounds_with_a_slow_worker(procs, tmp_path):
    """Two workers, worker 1 at a third of the speed, rounds of 0.4 s (400 steps: several rounds even
    on a fast machine): the fast one takes more steps, waits at each sync no longer than the exchange
    itself, and both end on one global hash."""
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "400", "--outer.inner_steps", "0",
            "--outer.sync_every_seconds", "0.4", "--outer.weighting", "tokens", "--run.slowdown", "1:3",
            "--checkpoint.every", "0"]
    res = procs.run(torchrun_cmd(2, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert len({s["global_hash"] for s in found}) == 1
    fast, slow = found
    assert fast["inner_steps"] > 1.3 * slow["inner_steps"], (fast["inner_steps"], slow["inner_steps"])
    assert fast["progress"] >= 400 and fast["progress"] == slow["progress"]
    syncs = [json.loads(line) for line in (run / "metrics-0.jsonl").read_text().splitlines()]
    syncs = [r for r in syncs if r["kind"] == "sync"]
    assert len(syncs) >= 2 and all(r["weight"] > 0.5 for r in syncs)
    # idle: waiting for the last member to arrive; the exchange itself: its seconds without that wait
    idle = [r["idle_seconds"] for r in syncs]
    itself = [r["seconds"] - r["idle_seconds"] for r in syncs]
    # (a small allowance for a loaded CI machine, where one step can stall for a scheduler tick)
    assert statistics.median(idle) <= statistics.median(itself) + 0.01, (idle, itself)
    assert sum(idle) <= 0.05 * fast["loop_seconds"]


@pytest.mark.e2e
@pytest.mark.slow
def test_token_rounds_under_torchrun_stop_and_resume(procs, tmp_path):
    """outer.target_tokens on the torch backend (the poll runs on DiLoCo's gloo group from a
    thread), checkpoints, and a resume that continues the group's progress."""
    run = tmp_path / "run"
    common = [*SMALL, "--run.dir", str(run), "--outer.inner_steps", "0", "--outer.target_tokens", "4096",
              "--outer.weighting", "tokens", "--run.slowdown", "1:2", "--checkpoint.every", "2"]
    res = procs.run(torchrun_cmd(2, [*common, "--run.steps", "60"]), tmp_path / "log1.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    first = summaries(run)
    assert len({s["global_hash"] for s in first}) == 1 and first[0]["progress"] >= 60
    res = procs.run(torchrun_cmd(2, [*common, "--run.steps", "120", "--checkpoint.resume", "auto"]),
                    tmp_path / "log2.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    second = summaries(run)
    assert len({s["global_hash"] for s in second}) == 1
    assert second[0]["progress"] >= 120 and second[0]["outer_steps"] > first[0]["outer_steps"]
    syncs = [json.loads(line) for line in (run / "metrics-0.jsonl").read_text().splitlines()]
    assert all(r["group_tokens"] >= 4096 for r in syncs if r["kind"] == "sync")
