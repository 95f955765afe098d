"""tools/chaos.py end to end: faults cost time, never correctness."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL
from tools.chaos_report import USUAL_LOSS_RATIO as LOSS_RATIO_BOUND  # why 1.10: its docstring


def chaos(procs, tmp_path: Path, *args: str, timeout: float = 900) -> dict:
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "tools/chaos.py", "--out", str(out), "--no-plot", "--workers", "2",
           "--nodes", "2", "--outer.inner_steps", "5", *SMALL, *args]
    res = procs.run(cmd, tmp_path / "chaos.txt", timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:]
    return json.loads(out.read_text())


def assert_correct(r: dict) -> None:
    assert r["survived"], r
    assert r["hash_mismatches"] == 0 and r["resumes_from_unseen_state"] == 0
    assert r["nonfinite_steps"] == 0
    assert r["final_workers"] == 2


@pytest.mark.e2e
def test_ci_chaos_run_survives_with_the_same_loss(procs, tmp_path):
    # 60 outer steps: the tiny model finishes a round in tens of milliseconds, while catching a
    # checkpoint write in the act takes the harness a few rounds; both faults need rounds left
    # to land in before the last one (where chaos fires none)
    r = chaos(procs, tmp_path, "--faults", "2", "--kinds", "kill_worker,kill_in_checkpoint",
              "--seed", "3", "--run.steps", "300")
    assert r["faults_injected"] == 2 and r["faults_followed_by_restart"] == 2  # both hit
    assert_correct(r)
    assert r["outer_steps_checked"] >= 8  # every outer step of every world was compared
    assert r["reference_survived"] and r["reference_hash_mismatches"] == 0
    assert 1 / LOSS_RATIO_BOUND <= r["loss_ratio"] <= LOSS_RATIO_BOUND
    if all(w.get("how", "exact") == "exact" for w in r["worlds"]):
        assert r["same_result_as_reference"], "exact resumes must reproduce the reference bit for bit"


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_one_killed_and_readded(procs, tmp_path):
    """Two torchrun agents on a c10d rendezvous at 127.0.0.1: one node dies, the other goes
    on alone (elastic shrink), the node comes back (elastic grow), the run finishes."""
    # long enough that the lone node is still training when the other one is back
    r = chaos(procs, tmp_path, "--faults", "1", "--kinds", "kill_node", "--no-reference",
              "--last-fault-at", "0.1", "--run.steps", "2000", timeout=1500)
    assert r["fault_counts"] == {"kill_node": 1, "rejoin": 1}
    assert_correct(r)
    sizes = [w["workers"] for w in r["worlds"]]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, r["worlds"]
    shrink = next(w for w in r["worlds"] if w["workers"] == 1)
    grow = r["worlds"][-1]
    assert (shrink["how"], shrink["written_by"]) == ("elastic", 2)
    assert (grow["how"], grow["written_by"]) == ("elastic", 1)


def test_report_accepts_failure_states_and_flags_states_never_reached(tmp_path):
    from tools.chaos_report import analyze

    def line(**kw):
        return json.dumps({"time": 0.0, **kw})

    def write(resumed_hash: str) -> dict:
        lines = [line(kind="event", event="start", world="w1", workers=2),
                 line(kind="sync", world="w1", outer_step=1, global_hash="a", loss=1.0),
                 # a peer died in the hash check after outer step 2: saved, never logged as a sync
                 line(kind="event", event="checkpoint", on_failure=True, world="w1", outer_step=2,
                      global_hash="b"),
                 line(kind="event", event="resume", world="w2", workers=2, how="elastic", outer_step=2,
                      written_by=2, global_hash=resumed_hash)]
        (tmp_path / "metrics-0.jsonl").write_text("\n".join(lines) + "\n")
        return analyze(tmp_path, 40)

    ok = write("b")
    assert ok["resumes_from_unseen_state"] == 0 and ok["resumes_from_failure_state"] == 1
    bad = write("c")
    assert bad["resumes_from_unseen_state"] == 1 and bad["resumes_from_failure_state"] == 0


def test_liar_fault_orders_a_lie_and_the_report_counts_poisoned_rounds(tmp_path):
    import random

    from tools.chaos import inject
    from tools.chaos_report import poisoned_rounds
    from tools.poison import Liar

    class TwoWorkers:
        def workers(self, node):
            return [100 + node]

    record = inject("liar", TwoWorkers(), random.Random(0), tmp_path, 20.0, [0, 1], ["sign"])
    assert record["kind"] == "liar" and record["poison"] == "sign" and record["rank"] in (0, 1)
    order = tmp_path / "poison-order.json"
    assert json.loads(order.read_text()) == {"kind": "sign", "rank": record["rank"]}
    import torch

    liar = Liar(record["rank"], tmp_path, trigger=order)
    honest = Liar(1 - record["rank"], tmp_path, trigger=order)
    delta = torch.ones(4)
    assert torch.equal(honest(delta, 0), delta) and torch.equal(liar(delta, 0), -10 * delta)
    liar(delta, 0)
    assert poisoned_rounds(tmp_path) == 2
