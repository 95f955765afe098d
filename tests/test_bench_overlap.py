"""tools/bench_overlap.py without training: its variant definitions, run arguments and ratios."""

from __future__ import annotations

import numpy as np
import pytest

from tools import bench_overlap
from tools.report import ToolError
from tools.runs import check_config


def test_variants_parse_and_build_valid_dilo_arguments():
    args = bench_overlap.parse(["--variants", "core,eager,x", "--variant", "x=--outer.overlap eager --outer.lr 0.3",
                                "--steps", "400", "--", "--outer.inner_steps", "10"])
    argv = bench_overlap.run_args(args, "x", 2)
    cfg = check_config(argv)
    assert (cfg.outer.overlap, cfg.outer.lr, cfg.run.seed, cfg.run.steps) == ("eager", 0.3, 2, 400)
    assert cfg.outer.inner_steps == 10 and cfg.data.eval_every == 10  # 100 inner steps / H
    for name in bench_overlap.VARIANTS:
        check_config(bench_overlap.run_args(args, name, 0))
    args = bench_overlap.parse(["--variants", "core,e", "--variant", "e=--outer.overlap eager --data.eval_every 1"])
    assert check_config(bench_overlap.run_args(args, "e", 0)).data.eval_every == 1  # a variant overrides
    assert check_config(bench_overlap.run_args(args, "core", 0)).data.eval_every == 5  # 100 inner steps / 20


@pytest.mark.parametrize("argv", [["--variants", "eager"], ["--variants", "core,nope"], ["--variant", "bad"]])
def test_bad_variants_are_refused(argv):
    with pytest.raises(ToolError):
        bench_overlap.parse(argv)


def test_ratios_are_to_the_same_seeds_core():
    runs = [{"variant": v, "seed": s, "args": "", "final_eval_loss": loss, "hashes_agree": True, "outer_steps": 5,
             "bytes_sent_per_worker": 1, "peak_sync_bytes": 1}
            for v, s, loss in [("core", 0, 2.0), ("core", 1, 4.0), ("eager", 0, 3.0), ("eager", 1, 4.4)]]
    rows = {r["variant"]: r for r in bench_overlap.aggregate(runs, ["core", "eager"])}
    assert rows["eager"]["ratios"] == pytest.approx([1.5, 1.1])
    assert rows["eager"]["ratio_to_core"]["median"] == pytest.approx(1.3)


def test_pair_reports_the_ratio_to_its_own_base_of_the_same_seed():
    args = bench_overlap.parse(["--variants", "core,c5,e5", "--variant", "c5=--outer.momentum 0.5",
                                "--variant", "e5=--outer.overlap eager --outer.momentum 0.5", "--pair", "e5=c5"])
    assert args.pairs == {"e5": "c5"}
    runs = [{"variant": v, "seed": s, "args": "", "final_eval_loss": loss, "hashes_agree": True, "outer_steps": 5,
             "bytes_sent_per_worker": 1, "peak_sync_bytes": 1}
            for v, s, loss in [("core", 0, 2.0), ("c5", 0, 2.5), ("c5", 1, 5.0), ("e5", 0, 3.0), ("e5", 1, 5.5)]]
    rows = {r["variant"]: r for r in bench_overlap.aggregate(runs, ["core", "c5", "e5"], args.pairs)}
    assert rows["e5"]["pair"]["base"] == "c5"
    assert rows["e5"]["pair"]["ratio"]["mean"] == pytest.approx((1.2 + 1.1) / 2)
    assert rows["e5"]["ratios"] == pytest.approx([1.5])  # to core: seed 0 only
    assert "pair" not in rows["c5"]


@pytest.mark.parametrize("spec", ["e5", "e5=nope", "nope=core"])
def test_bad_pairs_are_refused(spec):
    with pytest.raises(ToolError):
        bench_overlap.parse(["--variants", "core,e5", "--variant", "e5=--outer.overlap eager", "--pair", spec])


def test_ratio_curve_interpolates_the_base_at_the_variants_steps():
    def run(v, s, curve):
        return {"variant": v, "seed": s, "args": "", "final_eval_loss": curve[-1][1], "hashes_agree": True,
                "outer_steps": 5, "bytes_sent_per_worker": 1, "peak_sync_bytes": 1, "eval_curve": curve}
    runs = [run("core", 0, [[100, 4.0], [200, 2.0], [200, 2.0]]), run("core", 1, [[100, 2.0], [200, 1.0]]),
            run("eager", 0, [[150, 6.0], [200, 2.2]]), run("eager", 1, [[150, 3.0], [200, 1.0]]),
            run("eager", 2, [[150, 9.0]])]  # seed 2 has no core: left out
    rows = {r["variant"]: r for r in bench_overlap.aggregate(runs, ["core", "eager"])}
    # seed 0: 6 / 3 = 2, 2.2 / 2 = 1.1; seed 1: 3 / 1.5 = 2, 1 / 1 = 1
    assert [x for x, _ in rows["eager"]["ratio_curve"]] == [150, 200]
    assert [r for _, r in rows["eager"]["ratio_curve"]] == pytest.approx([2.0, 1.05])
    assert rows["core"]["ratio_curve"] == [[100, 1.0], [200, 1.0]]


def test_swing_is_the_late_evaluations_spread_around_their_running_mean_and_the_end_jump():
    # evaluations every 100 steps up to 9900, the last quarter (7500..9900) alternating ±0.01 around 2.0,
    # then the final one at 10000 (2.1: the flush); the first three quarters are ignored
    curve = [[step, 3.0 - step / 10000] for step in range(100, 7500, 100)]
    curve += [[step, 2.0 + (0.01 if step % 200 else -0.01)] for step in range(7500, 10000, 100)] + [[10000, 2.1]]
    run = {"final_eval_loss": 2.1, "eval_curve": curve}
    got = bench_overlap.swing(run)
    late = [loss for step, loss in curve if 7500 <= step < 10000]
    residuals = [late[i] - sum(late[i - 3:i + 4]) / 7 for i in range(3, len(late) - 3)]
    assert len(late) == 25 and got[0] == pytest.approx(float(np.std(residuals))) and 0.008 < got[0] < 0.012
    assert got[1] == pytest.approx(2.1 / late[-1])
    assert bench_overlap.swing({"final_eval_loss": 1.0, "eval_curve": [[100, 1.0], [200, 1.0]]}) is None
    rows = bench_overlap.aggregate([{"variant": "core", "seed": 0, "args": "", "hashes_agree": True, "outer_steps": 5,
                                     "bytes_sent_per_worker": 1, "peak_sync_bytes": 1, **run}], ["core"])
    assert rows[0]["swing"]["median"] == pytest.approx(got[0]) and rows[0]["end_jump"]["median"] == pytest.approx(got[1])
