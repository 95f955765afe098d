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


@pytest.mark.parametrize("methods", ["", "ddp,single"])
def test_bad_sweep_methods_are_refused(methods):
    with pytest.raises(ToolError):
        bench_tuned.parse([*SMALL, "--sweep-methods", methods])
