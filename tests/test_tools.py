"""The benchmark tools and the network simulator: their logic on tiny sizes, not timings."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from dilo.codecs import CODEC_NAMES, get_codec
from dilo.comm.local import local_groups
from tests.helpers import REPO, SMALL, child_env
from tools import (
    bench_comm,
    bench_overhead,
    bench_quality,
    bench_tuned,
    bench_utilization,
    netsim,
    plot,
    proctree,
    report,
)

TINY_MODEL = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
              "--model.seq_len", "32", "--data.max_bytes", "400000", "--data.batch_size", "4",
              "--data.eval_batches", "2"]


def ours(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith(f"{netsim.PREFIX}-{os.getpid()}-")}


# -- netsim ---------------------------------------------------------------------------------
def test_parse_rate():
    assert netsim.parse_rate("100mbit") == 100_000_000
    assert netsim.parse_rate("1Gbit/s") == 1_000_000_000
    assert netsim.parse_rate("2.5mbit") == 2_500_000
    assert netsim.parse_rate("20 mbit") == 20_000_000
    assert netsim.parse_rate("none") is None and netsim.parse_rate("loopback") is None
    with pytest.raises(ValueError, match="bytes per second"):
        netsim.parse_rate("100mbps")
    for bad in ("fast", "100", "-5mbit", "1kbit"):
        with pytest.raises(ValueError, match="rate"):
            netsim.parse_rate(bad)
    assert netsim.format_rate(100_000_000) == "100 Mbit/s" and netsim.format_rate(None) == "unlimited"
    args = netsim.tbf_args(1_000_000_000)
    assert args[:3] == ["tbf", "rate", "1000000000bit"] and int(args[4]) == 250_000
    assert int(netsim.tbf_args(20_000_000)[4]) == 16_000  # never below a few frames


def test_netsim_refuses_without_root_or_tools(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netsim.NetSimError, match="needs root"):
        netsim.NetSim(hosts=2, rate="10mbit").__enter__()
    monkeypatch.setattr(netsim.shutil, "which", lambda name: None)
    with pytest.raises(netsim.NetSimError, match="ip and tc"):
        netsim.require_tools()
    assert not ours(netsim.list_namespaces())


TRANSFER = """
import socket, sys, time
rank, n = int(sys.argv[1]), int(sys.argv[2])
if rank == 0:
    srv = socket.create_server(("10.77.0.1", 5001))
    conn, _ = srv.accept()
    got = 0
    while got < n:
        got += len(conn.recv(1 << 16))
    conn.sendall(b"k")
else:
    for _ in range(100):
        try:
            conn = socket.create_connection(("10.77.0.1", 5001))
            break
        except OSError:
            time.sleep(0.05)
    start = time.perf_counter()
    conn.sendall(bytes(n))
    conn.recv(1)
    print(time.perf_counter() - start)
"""


@pytest.mark.usefixtures("needs_netsim")
def test_netsim_links_are_shaped_and_everything_is_removed():
    before = set(netsim.list_namespaces())
    n = 400_000
    with netsim.NetSim(hosts=2, rate="20mbit") as net:
        made = ours(netsim.list_namespaces())
        assert made == {net.namespace(0), net.namespace(1), f"{net.name}-hub"}
        tx0 = net.counters(1)["tx_bytes"]
        procs = [net.popen(h, [sys.executable, "-c", TRANSFER, str(h), str(n)],
                           stdout=subprocess.PIPE, text=True) for h in (0, 1)]
        out = procs[1].communicate(timeout=60)[0]
        assert procs[0].wait(timeout=60) == 0 and procs[1].returncode == 0
        # at 20 Mbit/s the transfer cannot be faster than n*8/rate (tbf drops, never speeds up)
        assert float(out) > 0.8 * n * 8 / 20e6
        assert net.counters(1)["tx_bytes"] - tx0 >= n
    assert set(netsim.list_namespaces()) == before


@pytest.mark.usefixtures("needs_netsim")
@pytest.mark.e2e
def test_netsim_cli_cleans_up_after_a_failing_command():
    before = set(netsim.list_namespaces())
    cmd = [sys.executable, str(REPO / "tools" / "netsim.py"), "--rate", "100mbit", "--hosts", "2",
           "--", sys.executable, "-c", "import sys; sys.exit(3 + {rank})"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode in (3, 4), res.stderr
    assert "2 hosts on a hub" in res.stderr
    assert set(netsim.list_namespaces()) == before
    bad = subprocess.run([*cmd[:3], "10mbps", "--", "true"], capture_output=True, text=True,
                         timeout=60, env=child_env())
    assert bad.returncode == 2 and "bytes per second" in bad.stderr


@pytest.mark.usefixtures("needs_netsim")
@pytest.mark.e2e
def test_netsim_cli_cleans_up_on_sigterm(tmp_path):
    before = set(netsim.list_namespaces())
    marker = tmp_path / "child.pid"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "netsim.py"), "--rate", "none", "--", "sh", "-c",
         f"echo $$ > {marker}; exec sleep 60"], env=child_env(), start_new_session=True)
    try:
        deadline = time.time() + 30
        while not (marker.exists() and marker.read_text().strip()):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        child = int(marker.read_text())
        assert len(set(netsim.list_namespaces()) - before) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert set(netsim.list_namespaces()) == before
    time.sleep(0.2)
    assert not proctree.alive(child)


# -- bench_comm -----------------------------------------------------------------------------
@pytest.mark.parametrize("members", [2, 3, 4])
@pytest.mark.parametrize("numel", [1, 700, 5000])
def test_exchange_theory_matches_dilo(members, numel):
    """The formulas (written from the wire formats) against dilo's own byte counts."""
    for name in CODEC_NAMES:
        codec = get_codec(name, 64)
        assert bench_comm.encoded_bytes(name, numel, 64) == codec.encoded_nbytes(numel)
        results = [None] * members
        groups = local_groups(members)

        def member(rank):
            results[rank] = groups[rank].average(torch.ones(numel), codec)

        threads = [threading.Thread(target=member, args=(r,)) for r in range(members)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        payload = bench_comm.exchange_payload_bytes(name, numel, members, 64)
        assert {r.bytes_sent for r in results} == {payload}
        assert bench_comm.exchange_min_bytes(name, numel, members, 64) <= payload
    # without padding the two agree: 2(N-1) chunks of P/N fp32 elements
    assert bench_comm.exchange_min_bytes("fp32", 4000, 4, 256) == 2 * 3 * 1000 * 4
    assert bench_comm.ideal_seconds(1_000_000, 8_000_000) == 1.0


def test_bench_comm_summary_of_a_shared_loopback():
    """On one namespace every member reads the same lo counter: totals are split per member."""
    args = Namespace(workers=2, repeats=2, codecs=["fp32"], params=3000, block_size=256, pieces=[1])
    minimum = bench_comm.exchange_min_bytes("fp32", 3000, 2, 256)
    assert minimum == 2 * 1 * 1500 * 4

    def rep(seconds, tx):
        return {"seconds": seconds, "wire_tx": tx, "wire_rx": tx, "bytes_sent": minimum}
    workers = [{"barrier": [rep(0.001, 100)] * 2,
                "exchanges": {"fp32@1": [rep(0.1 + rank, 100 + 2 * minimum + 20)] * 2},
                "download": [rep(0.2, 100 + 24_000)] * 2,
                "raw_tcp": [rep(0.05, 100 + 2 * minimum)] * 2} for rank in range(2)]
    exchange, download, raw = bench_comm.summarize("loopback", "torch", workers, args)
    assert raw["what"] == "raw_tcp" and raw["wire_over_min"] == 1.0
    assert exchange["seconds_over_raw_tcp"] == pytest.approx(1.1 / 0.05)
    assert exchange["wire_bytes"]["median"] == minimum + 10
    assert exchange["seconds"]["median"] == 1.1  # the slowest member
    assert exchange["seconds_over_ideal"] is None  # no rate, no ideal
    assert download["wire_bytes"]["median"] == 24_000 and download["wire_over_min"] == 1.0
    assert exchange["pieces"] == 1
    workers[1]["exchanges"]["fp32@1"][0] = {**rep(0.1, 0), "bytes_sent": 7}
    with pytest.raises(report.ToolError, match="two-phase formula"):
        bench_comm.summarize("loopback", "torch", workers, args)


@pytest.mark.usefixtures("needs_netsim")
@pytest.mark.e2e
def test_bench_comm_runs_and_writes_its_json(tmp_path):
    before = set(netsim.list_namespaces())
    out = tmp_path / "comm.json"
    # The driver runs in this process (torch is imported already); the 2 workers are
    # subprocesses inside the simulated network, ended by the tool on any failure.
    assert bench_comm.main(["--params", "3000", "--workers", "2", "--rates", "20mbit",
                            "--repeats", "1", "--codecs", "fp32,int8", "--out", str(out),
                            "--png", str(tmp_path / "comm.png"), "--timeout", "180"]) == 0
    doc = json.loads(out.read_text())
    assert doc["tool"] == "bench_comm" and doc["settings"]["workers"] == 2
    rows = doc["results"]
    assert [(r["rate"], r["what"], r["codec"]) for r in rows] == [
        ("20mbit", "exchange", "fp32"), ("20mbit", "exchange", "int8"), ("20mbit", "download", "fp32"),
        ("20mbit", "raw_tcp", "fp32")]
    for r in rows:
        assert r["wire_over_min"] >= 0.99, r  # headers come on top of the payload
        assert r["seconds"]["n"] == 1 and r["seconds_over_ideal"]["median"] > 0
        assert r["ideal_seconds"] == r["min_bytes"] * 8 / 20e6
    assert rows[0]["payload_bytes"] == bench_comm.exchange_payload_bytes("fp32", 3000, 2, 256)
    assert rows[2]["min_bytes"] == 8 * 3000
    assert (tmp_path / "comm.png").read_bytes()[:4] == b"\x89PNG"
    assert set(netsim.list_namespaces()) == before


def test_tools_refuse_bad_input(capsys):
    with pytest.raises(report.ToolError, match="unknown codec 'int3'"):
        bench_comm.parse(["--codecs", "int3"])
    with pytest.raises(report.ToolError, match="unknown backend"):
        bench_comm.parse(["--backends", "mpi", "--params", "10"])
    with pytest.raises(ValueError, match="not understood"):
        bench_comm.parse(["--rates", "fast", "--params", "10"])
    with pytest.raises(report.ToolError, match="unknown codec"):
        bench_quality.parse(["--codecs", "int3"])
    with pytest.raises(report.ToolError, match="dilo config: unknown config key 'outer.bogus'"):
        bench_quality.parse(["--outer.bogus", "1"])
    with pytest.raises(report.ToolError, match="more than --steps"):
        bench_quality.parse(["--H", "500", "--steps", "100"])
    with pytest.raises(report.ToolError, match="NAME="):
        bench_utilization.parse(["--variant", "nothing"])
    with pytest.raises(report.ToolError, match="unknown config key 'outer.fragments'|dilo config"):
        bench_utilization.parse(["--variant", "streaming=--outer.fragments 4 --outer.fragmentz 1"])
    with pytest.raises(report.ToolError, match="must be a rate"):
        bench_utilization.parse(["--rate", "none"])
    assert report.run_tool(bench_comm.main, ["--codecs", "int3"], "bench_comm") == 2
    assert "bench_comm: error: --codecs: unknown codec 'int3'" in capsys.readouterr().err


# -- bench_quality --------------------------------------------------------------------------
def value(run: dict, key: str) -> str:
    """The value given last to `key` in a run's dilo arguments (the one dilo uses)."""
    args = run["args"]
    return args[len(args) - 1 - args[::-1].index(key) + 1]


def test_bench_quality_plan_keeps_tokens_equal():
    args = bench_quality.parse([*TINY_MODEL, "--workers", "4", "--steps", "60", "--H", "10,30",
                                "--codecs", "fp32,int8", "--seeds", "0,1"])
    runs = bench_quality.plan(args)
    assert len(runs) == 2 * (2 + 4)
    single = next(r for r in runs if r["kind"] == "single")
    ddp = next(r for r in runs if r["kind"] == "ddp")
    assert single["nproc"] == 1 and int(value(single, "--run.steps")) == 4 * 60
    assert int(value(single, "--inner.warmup_steps")) == 4 * args.warmup
    assert ddp["nproc"] == 4 and int(value(ddp, "--run.steps")) == 60
    assert 60 % int(value(ddp, "--outer.inner_steps")) == 0  # DDP bytes are booked every H
    dil = [r for r in runs if r["kind"] == "diloco"]
    assert {(r["H"], r["codec"], r["seed"]) for r in dil} == {
        (h, c, s) for h in (10, 30) for c in ("fp32", "int8") for s in (0, 1)}
    assert all(value(r, "--run.mode") == "diloco" for r in dil)


def test_bench_quality_aggregate_pairs_seeds():
    def res(kind, seed, loss, sent, h=None, codec="int8"):
        return {"name": f"{kind} H={h} seed={seed}", "kind": kind, "H": h, "codec": codec,
                "seed": seed, "final_eval_loss": loss, "bytes_sent_per_worker": sent, "tokens": 100}
    rows = bench_quality.aggregate([res("ddp", 0, 2.0, 1000.0), res("ddp", 1, 4.0, 1000.0),
                                    res("diloco", 0, 2.2, 10.0, 5), res("diloco", 1, 4.0, 20.0, 5)])
    dil = next(r for r in rows if r["kind"] == "diloco")
    assert dil["loss_ratio_to_ddp"]["median"] == pytest.approx(1.05)  # (1.1 + 1.0) / 2
    assert dil["ddp_bytes_over_bytes"]["min"] == 50 and dil["ddp_bytes_over_bytes"]["max"] == 100
    assert dil["final_eval_loss"]["mean"] == pytest.approx(3.1)


# -- bench_tuned ----------------------------------------------------------------------------
def test_bench_tuned_sweeps_then_confirms_the_best_setting_of_each_family():
    args = bench_tuned.parse([*TINY_MODEL, "--workers", "4", "--steps", "60", "--H", "10,20",
                              "--outer-lrs", "0.5,0.9", "--ddp-lrs", "1e-3,3e-3", "--seeds", "0",
                              "--confirm-seeds", "1,2", "--variant", "eager=--outer.overlap eager --outer.inner_steps 30"])
    runs = bench_tuned.sweep(args, args.seeds)
    assert len(runs) == 2 + 2 * 2
    assert {value(r, "--inner.lr") for r in runs if r["kind"] == "ddp"} == {"0.001", "0.003"}
    assert all(value(r, "--run.mode") == "ddp" and r["nproc"] == 4 for r in runs if r["kind"] == "ddp")
    var = bench_tuned.variants(args)
    assert [r["seed"] for r in var] == [0, 1, 2] and all(r["H"] == 30 for r in var)  # the variant's own H
    assert all(value(r, "--outer.inner_steps") == "30" for r in var)

    def res(spec, loss):
        return {**spec, "final_eval_loss": loss, "bytes_sent_per_worker": 10.0 if spec["kind"] == "diloco"
                else 1000.0, "tokens": 1, "outer_steps": 1}
    # losses: ddp 3e-3 best; diloco H=10 best at 0.9, H=20 best at 0.5
    losses = {"ddp lr=0.001": 3.0, "ddp lr=0.003": 2.0, "diloco H=10 int8 olr=0.5": 2.5,
              "diloco H=10 int8 olr=0.9": 2.2, "diloco H=20 int8 olr=0.5": 2.3, "diloco H=20 int8 olr=0.9": 2.4}
    done = [res(r, losses[r["config"]]) for r in runs]
    best = bench_tuned.best_settings(done)
    assert best[("ddp",)]["lr"] == 3e-3 and best[("diloco", 10, "int8")]["outer_lr"] == 0.9
    assert best[("diloco", 20, "int8")]["outer_lr"] == 0.5
    again = bench_tuned.confirm(args, best)
    assert sorted((r["config"], r["seed"]) for r in again) == sorted(
        (c, s) for c in ("ddp lr=0.003", "diloco H=10 int8 olr=0.9", "diloco H=20 int8 olr=0.5") for s in (1, 2))
    # the confirmation seed of ddp 3e-3 is worse: rows pair each run with best ddp of its own seed
    done += [res(r, {"ddp lr=0.003": 4.0}.get(r["config"], 4.4)) for r in again if r["seed"] == 1]
    rows = {row["config"]: row for row in bench_tuned.aggregate(done)["configs"]}
    h10 = rows["diloco H=10 int8 olr=0.9"]
    assert h10["best_of_family"] and not rows["diloco H=10 int8 olr=0.5"]["best_of_family"]
    assert h10["loss_ratio_to_best_ddp"]["mean"] == pytest.approx((2.2 / 2.0 + 4.4 / 4.0) / 2)
    assert h10["ddp_bytes_over_bytes"]["median"] == 100
    assert rows["ddp lr=0.001"]["loss_ratio_to_best_ddp"]["n"] == 1  # only seed 0 ran it


def test_bench_tuned_variants_of_other_kinds_keep_tokens_equal():
    args = bench_tuned.parse([*TINY_MODEL, "--workers", "4", "--steps", "60", "--H", "10", "--seeds", "3",
                              "--data.eval_batches", "4", "--variant", "ddp:ddp iid=--data.val_fraction 0.1",
                              "--variant", "m1:M1=--outer.inner_steps 20", "--variant", "m2:M2="])
    ddp, solo, m2 = bench_tuned.variants(args)
    # dilo scores eval_batches x batch_size evenly spaced windows: the same windows for every kind
    assert int(value(m2, "--data.eval_batches")) == 2 and int(value(solo, "--data.eval_batches")) == 1
    assert {int(value(r, "--data.eval_batches")) * int(value(r, "--data.batch_size"))
            for r in (ddp, solo, m2)} == {16}
    assert ddp["kind"] == "ddp" and ddp["nproc"] == 4 and value(ddp, "--run.mode") == "ddp"
    assert ddp["config"] == "ddp iid" and value(ddp, "--data.val_fraction") == "0.1"
    assert solo["kind"] == "m1" and solo["nproc"] == 1 and value(solo, "--run.mode") == "diloco"
    assert m2["nproc"] == 2 and int(value(m2, "--data.batch_size")) == 2 * 4 and m2["H"] == 10
    assert int(value(solo, "--data.batch_size")) == 4 * 4 and value(solo, "--run.steps") == "60"
    assert solo["H"] == 20 and solo["seed"] == 3


def test_bench_tuned_ratio_curve_pairs_eval_points_by_tokens():
    ddp = {"eval_curve": [[100, 4.0], [200, 2.0], [300, 1.0]]}
    run = {"eval_curve": [[100, 6.0], [150, 3.3], [300, 1.2], [400, 1.0]]}  # 150: ddp 3.0 interpolated
    assert bench_tuned.ratio_curve(run, ddp) == [[100, 1.5], [150, pytest.approx(1.1)], [300, pytest.approx(1.2)]]
    other = {"eval_curve": [[100, 4.0], [150, 3.9], [300, 1.0]]}
    mean = bench_tuned.mean_ratio_curve([(run, ddp), (other, ddp)])
    assert mean == [[100, 1.25], [150, pytest.approx(1.2)], [300, pytest.approx(1.1)]]


def test_bench_tuned_refuses_a_bad_variant():
    with pytest.raises(report.ToolError, match="NAME=ARGS"):
        bench_tuned.parse([*TINY_MODEL, "--variant", "--outer.overlap eager"])
    with pytest.raises(report.ToolError, match="KIND diloco, ddp or mN"):
        bench_tuned.parse([*TINY_MODEL, "--variant", "dp:x=--outer.lr 1"])
    with pytest.raises(report.ToolError, match="N dividing"):
        bench_tuned.parse([*TINY_MODEL, "--workers", "4", "--variant", "m3:x="])
    with pytest.raises(report.ToolError, match="multiple of 4"):  # 2 eval batches: m1 would score 1/2 of one
        bench_tuned.parse([*TINY_MODEL, "--workers", "4", "--variant", "m1:x="])
    with pytest.raises(report.ToolError, match="overlap"):
        bench_tuned.parse([*TINY_MODEL, "--variant", "x=--outer.overlap sideways"])


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_quality_end_to_end(tmp_path):
    out = tmp_path / "q.json"
    res = subprocess.run(
        [sys.executable, "tools/bench_quality.py", *SMALL[2:], "--workers", "2", "--steps", "6",
         "--H", "3", "--codecs", "int8", "--eval-points", "2", "--runs-dir", str(tmp_path / "runs"),
         "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    kinds = [r["kind"] for r in doc["results"]["runs"]]
    assert kinds == ["ddp", "single", "diloco"]
    runs = {r["kind"]: r for r in doc["results"]["runs"]}
    assert runs["single"]["tokens"] == runs["ddp"]["tokens"] == runs["diloco"]["tokens"]
    assert runs["diloco"]["outer_steps"] == 2 and len(runs["diloco"]["eval_curve"]) >= 1
    row = next(r for r in doc["results"]["configs"] if r["kind"] == "diloco")
    assert row["ddp_bytes_over_bytes"]["median"] > 1 and math.isfinite(row["loss_ratio_to_ddp"]["median"])
    assert out.with_suffix(".png").exists()


# -- bench_utilization ----------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.usefixtures("needs_netsim")
@pytest.mark.slow
def test_bench_utilization_end_to_end(tmp_path):
    before = set(netsim.list_namespaces())
    out = tmp_path / "u.json"
    res = subprocess.run(
        [sys.executable, "tools/bench_utilization.py", *SMALL[2:], "--workers", "2", "--steps", "10",
         "--outer.inner_steps", "5", "--rate", "50mbit", "--runs-dir", str(tmp_path / "runs"),
         "--out", str(out), "--png", ""], capture_output=True, text=True, timeout=300, cwd=REPO,
        env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ddp", "diloco"}
    assert rows["ddp"]["mode"] == "ddp" and rows["diloco"]["mode"] == "diloco"
    assert 0 < rows["diloco"]["utilization"]["median"] <= 1.5
    assert rows["ddp"]["wire_tx_bytes_per_worker"] > rows["diloco"]["wire_tx_bytes_per_worker"]
    assert set(netsim.list_namespaces()) == before


# -- bench_overhead -------------------------------------------------------------------------
def test_bench_overhead_compares_the_same_computation(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "o.json"
    try:
        assert bench_overhead.main([*TINY_MODEL, "--steps", "4", "--repeats", "1",
                                    "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())["results"]
    assert results["same_loss"] and results["max_last_loss_gap"] < 1e-4
    assert results["ratio"]["n"] == 1 and results["ratio"]["median"] > 0
    assert bench_overhead.cosine_lr(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert bench_overhead.cosine_lr(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


# -- plot -----------------------------------------------------------------------------------
def write_metrics(run: Path) -> None:
    run.mkdir()
    lines = [{"kind": "inner", "step": s, "loss": 5.0 - s / 10, "tokens_per_s": 1000.0} for s in (10, 20)]
    lines += [{"kind": "sync", "step": 20, "bytes_sent": 5000}, {"kind": "eval", "step": 20, "eval_loss": 3.0}]
    for w in (0, 1):
        (run / f"metrics-{w}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_plot_curves_and_png(tmp_path):
    write_metrics(tmp_path / "run")
    c = plot.curves(plot.load(str(tmp_path / "run")))
    assert c["tokens_per_s"] == [(10, 2000.0), (20, 2000.0)]  # both workers summed
    assert c["bytes_sent"] == [(0, 0), (20, 5000)] and c["eval_loss"] == [(20, 3.0)]
    assert plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(report.ToolError, match="no metrics"):
        plot.load(str(tmp_path))


def test_plotting_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "run")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.run_tool(plot.main, [str(tmp_path / "run"), "--out", str(tmp_path / "p.png")],
                           "plot") == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    with pytest.raises(report.ToolError, match="pip install matplotlib"):
        bench_comm.main(["--params", "100", "--workers", "2", "--out", str(tmp_path / "c.json")])


def test_describe():
    d = report.describe([3.0, 1.0, 2.0, float("nan")])
    assert d == {"n": 3, "median": 2.0, "mean": 2.0, "min": 1.0, "max": 3.0, "std": 1.0}
    assert report.describe([])["median"] is None
