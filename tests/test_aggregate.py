"""Robust aggregation (issue 13, dilo/aggregate.py, docs/robust.md): each rule against a reference
written here in numpy on the members' decoded contributions, through in-process groups and
DiLoCo's outer step; the no-contribution marker, skipped steps and residual resets."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from dilo.comm.protocol import chunk_numel
from dilo.config import Config
from dilo.config_checks import validate
from dilo.options import default_aggregate
from dilo.stats import RunTotals
from tests.helpers import run_workers

BLOCK = 32
LR, MOMENTUM = 0.7, 0.9


# -- the reference: numpy on what each owner decodes ----------------------------------------
def _contributions(vectors: list[torch.Tensor], codec, size: int) -> tuple[list[list[np.ndarray]], int]:
    """contrib[j][m]: member m's chunk j as owner j decodes it (fp32 numpy)."""
    numel = vectors[0].numel()
    chunk = chunk_numel(numel, size, codec.block_size)
    out = [[None] * size for _ in range(size)]
    for m, v in enumerate(vectors):
        padded = torch.zeros(chunk * size)
        padded[:numel] = v
        for j in range(size):
            part = padded[j * chunk:(j + 1) * chunk]
            out[j][m] = codec.decode(codec.encode(part), chunk).numpy().copy()
    return out, chunk


def _seq_sum(rows) -> np.ndarray:
    total = np.zeros_like(rows[0], dtype=np.float32)
    for r in rows:
        total = (total + r).astype(np.float32)
    return total


def _reference_rule(rule: str, values: list[np.ndarray], factors=None, trim: int = 1) -> np.ndarray:
    n = len(values)
    if rule == "mean":
        return (_seq_sum(values) / np.float32(n)).astype(np.float32)
    if rule == "clip":
        scaled = [(v * np.float32(c)).astype(np.float32) if c < 1 else v for v, c in zip(values, factors)]
        return (_seq_sum(scaled) / np.float32(n)).astype(np.float32)
    s = np.sort(np.stack(values), axis=0)
    if rule == "median":
        return s[n // 2] if n % 2 else ((s[n // 2 - 1] + s[n // 2]) / np.float32(2)).astype(np.float32)
    k = min(trim, (n - 1) // 2)
    return (_seq_sum(list(s[k:n - k])) / np.float32(n - 2 * k)).astype(np.float32)


def _reference_factors(contrib, size: int, ratio: float) -> list[float]:
    norms = []
    for m in range(size):
        square = sum(float(np.square(contrib[j][m].astype(np.float64)).sum()) for j in range(size))
        norms.append(float(np.float32(math.sqrt(square))))
    median = float(np.median(np.array(norms, dtype=np.float64)))
    return [1.0 if n <= ratio * median else float(np.float32(ratio * median / n)) for n in norms]


def reference_average(rule: str, vectors: list[torch.Tensor], codec, trim: int = 1,
                      ratio: float = 2.0) -> torch.Tensor:
    size, numel = len(vectors), vectors[0].numel()
    contrib, chunk = _contributions(vectors, codec, size)
    factors = _reference_factors(contrib, size, ratio) if rule == "clip" else None
    result = []
    for j in range(size):
        valid = [m for m in range(size) if np.isfinite(contrib[j][m]).all()]
        owned = _reference_rule(rule, [contrib[j][m] for m in valid],
                                [factors[m] for m in valid] if factors else None, trim)
        result.append(codec.decode(codec.encode(torch.from_numpy(owned)), chunk))
    return torch.cat(result)[:numel]


def _vectors(size: int, numel: int = 700, attacker: float = 1000.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(numel, generator=g) * (1 + 0.1 * m) for m in range(size)]
    vs[-1] = vs[-1] * attacker
    return vs


# -- the exchange: every rule, exact, identical on every member --------------------------
@pytest.mark.parametrize("codec_name", ["int8", "fp32"])
@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "median", "clip"])
@pytest.mark.parametrize("size", [4, 5])
def test_rule_matches_reference_through_local_groups(rule, codec_name, size):
    from dilo.aggregate import Aggregate

    codec = get_codec(codec_name, BLOCK)
    vs = _vectors(size)
    groups = local_groups(size)
    for g in groups:
        g.aggregate = Aggregate(rule)
    results = run_workers(lambda r: groups[r].average(vs[r], codec), size)
    expected = reference_average(rule, vs, codec)
    for res in results:
        assert torch.equal(res.average, expected)
    if rule == "clip":
        assert [m for m, _ in results[0].clipped] == [size - 1]
    if rule != "mean":  # the attacker's ×1000 barely moves a robust rule
        assert expected.norm() < 3 * vs[0].norm()


def test_liar_past_the_sender_check_is_dropped_as_saturated():
    """A member that skips its own check: fp16 clamps +inf to 65504, the owner drops it."""
    codec = get_codec("fp16")
    vs = _vectors(4, attacker=1.0)
    vs[3] = torch.full_like(vs[3], float("inf"))
    groups = local_groups(4)
    results = run_workers(lambda r: groups[r].average(vs[r], codec), 4)
    assert all(res.rejected == [(3, res.rejected[0][1])] and "saturated" in res.rejected[0][1] for res in results)
    assert torch.equal(results[0].average, reference_average("mean", vs[:3] + [vs[3] * float("nan")], codec))


# -- DiLoCo's outer step -------------------------------------------------------------------
_INIT = threading.Lock()


def _model() -> nn.Module:
    with _INIT:  # (threads share torch's global RNG: the same θ0 in every run)
        torch.manual_seed(0)
        return nn.Linear(40, 12)


def _offset(rank: int, numel: int, scale: float) -> torch.Tensor:
    d = torch.randn(numel, generator=torch.Generator().manual_seed(100 + rank)) * 1e-2
    return d * scale


def _run_diloco(size: int, offsets, steps: int = 1, **kw) -> list[dict]:
    groups = local_groups(size)

    def worker(rank: int) -> dict:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dl = DiLoCo(model, opt, inner_steps=1, outer_lr=LR, outer_momentum=MOMENTUM, group=groups[rank],
                    block_size=BLOCK, **kw)
        out = {"theta0": dl.fragments[0].theta.detach().clone(), "stats": []}
        for step in range(steps):
            with torch.no_grad():
                flat = torch.cat([p.reshape(-1) for p in model.parameters()])
                live = flat + offsets(rank, step)
                torch.nn.utils.vector_to_parameters(live, model.parameters())
            out["stats"].append(dl.step())
        out["theta"] = dl.fragments[0].theta.detach().clone()
        m = dl.fragments[0].momentum()
        out["momentum"] = None if m is None else m.clone()
        out["residual"] = dl.fragments[0].residual
        out["hash"] = dl.global_hash()
        dl.close()
        return out

    return run_workers(worker, size)


@pytest.mark.parametrize("codec_name", ["int8", "fp32"])
@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "median", "clip"])
def test_outer_step_with_each_rule_matches_reference(rule, codec_name):
    size, numel = 4, 40 * 12 + 12
    offsets = lambda rank, step: _offset(rank, numel, 1000.0 if rank == 3 else 1.0)  # noqa: E731
    out = _run_diloco(size, offsets, codec=codec_name, aggregate=rule)
    theta0 = out[0]["theta0"]
    deltas = [theta0 - (theta0 + offsets(m, 0)) for m in range(size)]
    g = reference_average(rule, deltas, get_codec(codec_name, BLOCK))
    theta = nn.Parameter(theta0.clone())
    sgd = torch.optim.SGD([theta], lr=LR, momentum=MOMENTUM, nesterov=True)
    theta.grad = g
    sgd.step()
    for o in out:
        assert torch.equal(o["theta"], theta.detach())
        assert o["hash"] == out[0]["hash"]


@pytest.mark.parametrize("poison,codec_name", [("nan", "int8"), ("inf", "bf16"), ("overflow", "fp16")])
def test_bad_sender_withholds_and_is_dropped(poison, codec_name, caplog):
    size, numel = 4, 40 * 12 + 12
    bad = {"nan": float("nan"), "inf": float("inf"), "overflow": 1e6}[poison]

    def offsets(rank, step):
        d = _offset(rank, numel, 1.0)
        return torch.full_like(d, bad) if rank == 3 else d

    with caplog.at_level(logging.WARNING, logger="dilo"):
        out = _run_diloco(size, offsets, codec=codec_name)
    assert "sending no contribution" in caplog.text
    theta0 = out[0]["theta0"]
    honest = [theta0 - (theta0 + offsets(m, 0)) for m in range(3)]
    marker = torch.full_like(honest[0], float("nan"))
    g = reference_average("mean", honest + [marker], get_codec(codec_name, BLOCK))
    theta = nn.Parameter(theta0.clone())
    sgd = torch.optim.SGD([theta], lr=LR, momentum=MOMENTUM, nesterov=True)
    theta.grad = g
    sgd.step()
    for o in out:
        assert torch.isfinite(o["theta"]).all() and torch.equal(o["theta"], theta.detach())
    assert sum(o["stats"][0].dropped for o in out) == size  # every owner dropped member 3's chunk
    assert all(m == 3 for o in out for m, _ in o["stats"][0].rejected)
    assert out[3]["stats"][0].withheld == 1 and out[0]["stats"][0].withheld == 0


def test_nothing_valid_skips_the_step_everywhere(caplog):
    size, numel = 4, 40 * 12 + 12

    def offsets(rank, step):  # step 0 honest (momentum exists), step 1 everyone non-finite
        d = _offset(rank, numel, 1.0)
        return d if step == 0 else torch.full_like(d, float("nan"))

    with caplog.at_level(logging.WARNING, logger="dilo"):
        two = _run_diloco(size, offsets, steps=2)
    one = _run_diloco(size, offsets, steps=1)
    assert "step skipped" in caplog.text
    for o, ref in zip(two, one):
        assert torch.equal(o["theta"], ref["theta"]) and torch.equal(o["momentum"], ref["momentum"])
        assert o["stats"][1].skipped == 1 and o["stats"][1].outer_step == 2
        assert o["hash"] == two[0]["hash"]


def test_non_finite_residual_is_reset_and_the_worker_contributes_again():
    size, numel = 4, 40 * 12 + 12

    def offsets(rank, step):
        d = _offset(rank, numel, 1.0)
        return torch.full_like(d, float("nan")) if rank == 3 and step == 0 else d

    out = _run_diloco(size, offsets, steps=2, codec="int8", error_feedback=True)
    assert out[3]["stats"][0].reset_residuals == 1 and out[3]["stats"][1].reset_residuals == 0
    assert torch.isfinite(out[3]["residual"]).all()
    assert all(o["stats"][1].dropped == 0 for o in out)  # member 3 is back at step 2
    assert all(o["hash"] == out[0]["hash"] for o in out)


# -- defaults, refusals, totals --------------------------------------------------------------
def test_defaults_per_backend():
    assert default_aggregate(open_membership=False) == "mean"
    assert default_aggregate(open_membership=True) == "trimmed_mean"
    groups = local_groups(2)
    dl = run_workers(lambda r: DiLoCo(_model(), torch.optim.SGD(_model().parameters(), lr=0.0), 1,
                                      group=groups[r]), 2)
    assert dl[0].aggregate.name == "mean" and groups[0].aggregate.name == "mean"


def test_trim_that_leaves_nothing_is_refused():
    groups = local_groups(4)
    with pytest.raises(ValueError, match="outer.trim = 2 .* use outer.trim <= 1"):
        DiLoCo(_model(), torch.optim.SGD(_model().parameters(), lr=0.0), 1, group=groups[0],
               aggregate="trimmed_mean", trim=2)


@pytest.mark.parametrize("key,value,message", [
    ("outer.aggregate", "mode", "outer.aggregate must be auto or one of"),
    ("outer.trim", 0, "outer.trim"),
    ("outer.clip_ratio", float("inf"), "outer.clip_ratio"),
    ("outer.clip_ratio", 0.5, "outer.clip_ratio"),
])
def test_config_refusals(key, value, message):
    cfg = Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_clip_is_refused_in_a_swarm():
    cfg = Config()
    cfg.outer.aggregate, cfg.comm.backend = "clip", "hivemind"
    with pytest.raises(ValueError, match="clip needs a fixed group"):
        validate(cfg)


def test_summary_fields():
    assert {"dropped_contributions", "clipped_contributions", "skipped_outer_steps", "reset_residuals",
            "withheld_contributions"} <= RunTotals().summary().keys()


def test_report_warns_and_counts_per_contributor(tmp_path, caplog):
    """Every dropped or clipped contribution: a WARNING naming the worker and a labelled counter."""
    from types import SimpleNamespace

    from dilo.metrics import Metrics
    from dilo.stats import SyncStats
    from dilo.train_report import RunReport

    stats = SyncStats(outer_step=3, seconds=0.1, bytes_sent=1, bytes_received=1, num_peers=4, global_hash="ab" * 8,
                      dropped=1, codec_error=0.0, pseudo_grad_norm=1.0, clipped=1, skipped=1, reset_residuals=1,
                      withheld=1, rejected=[(2, "non-finite")], clipped_members=[(3, 0.25)])
    with Metrics(tmp_path, 0) as metrics:
        report = SimpleNamespace(metrics=metrics, state=SimpleNamespace(inner_step=30), world_id="w",
                                 cfg=SimpleNamespace(outer=SimpleNamespace(fragments=1)))
        with caplog.at_level(logging.WARNING, logger="dilo"):
            RunReport.sync(report, stats, 1.0)
        text = metrics.render_prometheus()
    assert "dropped the contribution of worker 2: non-finite" in caplog.text
    assert "clipped the contribution of worker 3 by 0.25" in caplog.text
    assert 'dilo_dropped_contributions_total{contributor="2",worker="0"} 1.0' in text
    assert 'dilo_clipped_contributions_total{contributor="3",worker="0"} 1.0' in text
    for name in ("skipped_outer_steps", "reset_residuals", "withheld_contributions"):
        assert f'dilo_{name}_total{{worker="0"}} 1.0' in text


def test_buffers_are_averaged_exactly_whatever_the_rule():
    """Floating-point buffers (BatchNorm statistics) take the exact fp32 mean, not the robust rule."""
    size = 4
    groups = local_groups(size)
    values = [torch.randn(6, generator=torch.Generator().manual_seed(50 + r)) * (100 if r == 3 else 1)
              for r in range(size)]

    def worker(rank: int) -> torch.Tensor:
        with _INIT:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        dl = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.0), 1, group=groups[rank], aggregate="median")
        model[1].running_mean.copy_(values[rank])
        dl.step()
        dl.close()
        return model[1].running_mean.clone()

    expected = torch.from_numpy(_seq_sum([v.numpy() for v in values]) / np.float32(size))
    assert all(torch.equal(b, expected) for b in run_workers(worker, size))
