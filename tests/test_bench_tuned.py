"""tools/bench_tuned.py without training: each method at its own schedule (variant overrides,
--sweep-methods)."""

from __future__ import annotations

import pytest

from tools import bench_tuned
from tools.report import ToolError
from tools.runs import check_config

SMALL = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.seq_len", "64",
         "--data.batch_size", "8", "--steps", "200", "--H", "50", "--ddp-lrs", "0.004", "--outer-lrs", "0.7",
         "--seeds", "0,1", "--runs-dir", "runs/never"]


def test_a_variant_gives_diloco_its_own_schedule_and_data_parallel_keeps_the_common_one():
    args = bench_tuned.parse([*SMALL, "--inner.min_lr_ratio", "0.1", "--sweep-methods", "ddp",
                              "--variant", "flat=--inner.min_lr_ratio 1.0",
                              "--variant", "ddp:ddp flat=--inner.min_lr_ratio 0.5"])
    sweep = bench_tuned.sweep(args, args.seeds)
    assert [r["kind"] for r in sweep] == ["ddp", "ddp"]  # no DiLoCo sweep
    assert all(check_config(r["args"]).inner.min_lr_ratio == 0.1 for r in sweep)
    runs = {(r["config"], r["seed"]): r for r in bench_tuned.variants(args)}
    flat = check_config(runs["flat", 1]["args"])
    assert (flat.run.mode, flat.inner.min_lr_ratio, flat.outer.lr, flat.run.seed) == ("diloco", 1.0, 0.7, 1)
    ddp_flat = check_config(runs["ddp flat", 0]["args"])
    assert (ddp_flat.run.mode, ddp_flat.inner.min_lr_ratio) == ("ddp", 0.5)


def test_the_default_sweep_runs_both_methods():
    args = bench_tuned.parse(SMALL)
    assert sorted({r["kind"] for r in bench_tuned.sweep(args, args.seeds)}) == ["ddp", "diloco"]


def test_sweep_methods_none_runs_the_variants_alone_on_their_seeds():
    args = bench_tuned.parse([*SMALL, "--sweep-methods", "none", "--seeds", "2",
                              "--variant", "decay0=--inner.min_lr_ratio 0.0",
                              "--variant", "ddp:ddp decay0=--inner.lr 4e-3 --inner.min_lr_ratio 0.0",
                              "--baseline", "ddp decay0"])
    assert bench_tuned.sweep(args, args.seeds) == []
    assert bench_tuned.confirm(args, bench_tuned.best_settings([])) == []
    runs = {r["config"]: check_config(r["args"]) for r in bench_tuned.variants(args)}
    assert {(c.run.mode, c.run.seed, c.inner.min_lr_ratio) for c in runs.values()} == {("diloco", 2, 0.0),
                                                                                      ("ddp", 2, 0.0)}
    with pytest.raises(ToolError, match="--variant"):
        bench_tuned.parse([*SMALL, "--sweep-methods", "none"])


@pytest.mark.parametrize("methods", ["", "ddp,single", "none,ddp"])
def test_bad_sweep_methods_are_refused(methods):
    with pytest.raises(ToolError):
        bench_tuned.parse([*SMALL, "--sweep-methods", methods])


def test_ratios_are_to_the_named_baseline_paired_by_seed():
    def run(config, kind, seed, loss):
        return {"config": config, "kind": kind, "seed": seed, "final_eval_loss": loss, "H": 50 if kind != "ddp" else None,
                "codec": "int8", "lr": None, "outer_lr": None, "variant": None if "=" in config else config,
                "phase": "sweep" if "=" in config else "variant", "bytes_sent_per_worker": 1, "tokens": 1,
                "outer_steps": 1, "eval_curve": []}
    results = [run("ddp lr=0.004", "ddp", 0, 2.0), run("ddp lr=0.004", "ddp", 1, 4.0),
               run("ddp flat", "ddp", 0, 1.6), run("ddp flat", "ddp", 1, 5.0),
               run("diloco H=50 int8 olr=0.7", "diloco", 0, 2.4), run("diloco H=50 int8 olr=0.7", "diloco", 1, 4.4)]
    rows = {r["config"]: r for r in bench_tuned.aggregate(results)["configs"]}
    assert rows["diloco H=50 int8 olr=0.7"]["loss_ratio_to_best_ddp"]["mean"] == pytest.approx(1.15)
    summary = bench_tuned.aggregate(results, "ddp flat")
    assert summary["baseline"] == "ddp flat" and summary["best_ddp"] == "ddp lr=0.004"
    rows = {r["config"]: r for r in summary["configs"]}
    assert rows["diloco H=50 int8 olr=0.7"]["loss_ratio_to_best_ddp"]["mean"] == pytest.approx((1.5 + 0.88) / 2)


def test_an_unknown_baseline_is_refused():
    with pytest.raises(ToolError, match="--baseline"):
        bench_tuned.parse([*SMALL, "--baseline", "ddp lr=0.002"])
    args = bench_tuned.parse([*SMALL, "--variant", "ddp:ddp flat=--inner.min_lr_ratio 0", "--baseline", "ddp flat"])
    assert args.baseline == "ddp flat"
