"""Compute utilization under a rate limit: data-parallel vs DiLoCo, and any other variant.

    python tools/bench_utilization.py --quick --out runs/bench/utilization.json
    python tools/bench_utilization.py --rate 100mbit --workers 4 --steps 100 --out util.json
    # more variants are dilo config overrides (e.g. streaming / overlapped DiLoCo):
    python tools/bench_utilization.py ... --variant streaming="--outer.fragments 4 --outer.delay 2"

Each variant is one multi-worker dilo run under tools/netsim.py: one namespace per
worker, each with its own link of `--rate` (both directions), joined by a hub; in each
namespace `torchrun --nnodes M --node-rank i --nproc-per-node 1 --master-addr <host 0>`
starts one worker. Same config, data, steps and tokens for every variant; any other
`--section.key VALUE` goes to every variant.

Utilization = time the run would need if it only computed ÷ its training-loop time
(`loop_seconds` in dilo's summary). The compute-only time is steps x the median time of
one inner step of the reference variant (`--reference`, default `diloco`): its inner
steps do no communication, so its `compute_seconds / steps` is a step's cost on this
machine, under the same CPU sharing. A data-parallel step's all-reduce runs inside
backward (its `compute_seconds` includes waiting on the network), so DDP is measured
against that reference. For DiLoCo variants `compute_fraction` = own compute / loop
time is reported too (it should agree). Medians over workers; --repeats interleaves the
variants (ABAB) and reports medians and spread over repeats.

Sync time vs bytes/rate: a DiLoCo worker's `sync_seconds` starts when *it* reaches the
outer step, so it includes waiting for the slowest peer (stragglers: on a shared CPU
the workers' speeds differ). The median worker's ratio shows that cost; the minimum
over workers (the last to arrive waits least) is close to the exchange alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import netsim  # noqa: E402
from tools.report import (ToolError, describe, document, png_path, require_matplotlib,  # noqa: E402
                          run_tool, write_json)
from tools.runs import REPO, check_config, child_env, summaries, train_cmd, wait_all  # noqa: E402

DEFAULT_VARIANTS = {"ddp": "--run.mode ddp", "diloco": "--run.mode diloco"}
QUICK = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2",
         "--model.seq_len", "64", "--data.batch_size", "8", "--data.max_bytes", "1000000",
         "--inner.warmup_steps", "5", "--data.eval_batches", "2"]
PORT = 29512  # inside private namespaces


def run_variant(name: str, args: argparse.Namespace, variant_args: list[str], run_dir: Path) -> dict:
    """One run of one variant in a fresh simulated network; its summaries and wire bytes."""
    dilo_args = [*args.dilo_args, *variant_args, "--run.dir", str(run_dir)]
    with netsim.NetSim(hosts=args.workers, rate=args.rate) as net:
        procs, logs = [], []
        for host in range(args.workers):
            logs.append(run_dir.with_name(f"{run_dir.name}-{host}.log"))
            cmd = train_cmd(dilo_args, nproc=1, nnodes=args.workers, node_rank=str(host),
                            master_addr=net.address(0), master_port=PORT)
            with open(logs[-1], "wb") as f:
                procs.append(net.popen(host, cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO))
        wait_all(procs, args.timeout, f"variant {name}", logs)
        wire = [net.counters(h) for h in range(args.workers)]
    found = summaries(run_dir)
    if len(found) != args.workers:
        raise ToolError(f"variant {name}: {len(found)} summaries in {run_dir}, expected {args.workers}")
    return {"summaries": found, "wire": wire}


def summarize(name: str, runs: list[dict], ref_step_seconds: float, args: argparse.Namespace) -> dict:
    steps = runs[0]["summaries"][0]["inner_steps"]
    util, fraction, loops, sync_ratio, exchange_ratio = [], [], [], [], []
    for run in runs:
        s = run["summaries"]
        loop = statistics.median(x["loop_seconds"] for x in s)
        loops.append(loop)
        util.append(steps * ref_step_seconds / loop)
        fraction.append(statistics.median(x["compute_seconds"] / x["loop_seconds"] for x in s))
        sent = statistics.fmean(x["bytes_sent"] for x in s)
        if not s[0]["bytes_are_estimated"] and sent:
            ideal = sent * 8 / args.rate_bps
            sync_ratio.append(statistics.median(x["sync_seconds"] for x in s) / ideal)
            # A worker's sync time includes waiting for the slowest peer to finish its inner
            # steps; the last to arrive waits least, so the minimum is ~ the exchange itself.
            exchange_ratio.append(min(x["sync_seconds"] for x in s) / ideal)
    last = runs[-1]["summaries"]
    return {
        "variant": name, "args": args.variants[name], "steps": steps,
        "mode": last[0]["mode"], "utilization": describe(util),
        "compute_fraction": describe(fraction) if last[0]["mode"] != "ddp" else None,
        "loop_seconds": describe(loops),
        "tokens_per_second": describe([sum(x["tokens"] for x in r["summaries"]) / lp
                                       for r, lp in zip(runs, loops)]),
        "sync_seconds_per_worker": describe([statistics.median(x["sync_seconds"] for x in r["summaries"])
                                             for r in runs]),
        "sync_seconds_over_bytes_per_rate": describe(sync_ratio) if sync_ratio else None,
        "min_worker_sync_seconds_over_bytes_per_rate": describe(exchange_ratio) if exchange_ratio else None,
        "bytes_sent_per_worker": statistics.fmean(x["bytes_sent"] for x in last),
        "bytes_are_estimated": last[0]["bytes_are_estimated"],
        "wire_tx_bytes_per_worker": statistics.fmean(w["tx_bytes"] for w in runs[-1]["wire"]),
        "final_eval_loss": last[0]["final_eval_loss"],
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.55 * len(rows)))
    names = [r["variant"] for r in rows]
    vals = [100 * r["utilization"]["median"] for r in rows]
    lo = [100 * (r["utilization"]["median"] - r["utilization"]["min"]) for r in rows]
    hi = [100 * (r["utilization"]["max"] - r["utilization"]["median"]) for r in rows]
    ax.barh(names, vals, xerr=[lo, hi], color="tab:blue")
    for y, v in enumerate(vals):
        ax.text(v + 1, y, f"{v:.1f}%", va="center", fontsize=8)
    ax.axvline(90, color="k", ls="--", lw=0.8)
    ax.set(xlim=(0, 110), xlabel="compute utilization (%)", title=title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_utilization", description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE is passed to every variant.")
    p.add_argument("--quick", action="store_true", help="a smaller model, 40 steps, 100mbit")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"), help="dilo TOML preset")
    p.add_argument("--workers", type=int, default=4, help="M (default 4)")
    p.add_argument("--rate", default="100mbit", help="each worker's link rate (default 100mbit)")
    p.add_argument("--steps", type=int, help="inner steps per worker (default: the config's)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="add a variant: dilo overrides, e.g. streaming='--outer.fragments 4'")
    p.add_argument("--only", help="comma list of variants to run (default: all)")
    p.add_argument("--reference", default="diloco", help="variant whose inner steps define compute time")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    p.add_argument("--runs-dir", help="where runs are kept (default runs/bench_utilization-<time>)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--out", default="runs/bench/utilization.json", help="JSON output")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    args, dilo_args = p.parse_known_args(argv)
    for a in dilo_args:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise ToolError(f"unknown option {a}; dilo keys look like --section.key")
    args.rate_bps = netsim.parse_rate(args.rate)
    if args.rate_bps is None:
        raise ToolError("--rate must be a rate (e.g. 100mbit): utilization is measured under a limit")
    variants = dict(DEFAULT_VARIANTS)
    for spec in args.variant:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            raise ToolError(f"--variant {spec!r}: write NAME='--section.key VALUE ...'")
        variants[name] = rest
    if args.only:
        unknown = set(args.only.split(",")) - set(variants)
        if unknown:
            raise ToolError(f"--only: unknown variants {sorted(unknown)}; have {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    if args.reference not in variants:
        raise ToolError(f"--reference {args.reference!r} is not among the variants {sorted(variants)}")
    args.variants = variants
    if args.workers < 2 or args.repeats < 1:
        raise ToolError("--workers must be >= 2 and --repeats >= 1")
    base = ["--config", args.config, *(QUICK if args.quick else []), "--metrics.progress", "off",
            "--checkpoint.every", "0"]
    if not any(a.startswith("--run.threads") for a in dilo_args):
        base += ["--run.threads", str(max(1, (os.cpu_count() or 1) // args.workers))]
    args.dilo_args = [*base, *dilo_args]
    steps = args.steps or (40 if args.quick else None)
    if steps:
        args.dilo_args += ["--run.steps", str(steps)]
    for name, extra in variants.items():  # every variant's config is valid before anything runs
        cfg = check_config([*args.dilo_args, *shlex.split(extra)])
        if name == args.reference and cfg.run.mode != "diloco":
            raise ToolError(f"--reference {name}: its inner steps must not communicate; "
                            "use a run.mode = diloco variant")
    args.runs_dir = Path(args.runs_dir or f"runs/bench_utilization-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    netsim.require_tools()
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for rep in range(args.repeats):
        order = list(args.variants) if rep % 2 == 0 else list(reversed(args.variants))
        for name in order:
            run_dir = args.runs_dir / f"{name}-r{rep}"
            if run_dir.exists():
                raise ToolError(f"{run_dir} exists; choose another --runs-dir")
            run_dir.mkdir(parents=True)
            print(f"bench_utilization: repeat {rep + 1}/{args.repeats}: {name} "
                  f"({args.workers} workers at {netsim.format_rate(args.rate_bps)})",
                  file=sys.stderr, flush=True)
            runs[name].append(run_variant(name, args, shlex.split(args.variants[name]), run_dir))
    ref = [x["compute_seconds"] / x["inner_steps"]
           for run in runs[args.reference] for x in run["summaries"]]
    ref_step = statistics.median(ref)
    rows = [summarize(name, runs[name], ref_step, args) for name in args.variants]
    settings = {"workers": args.workers, "rate": args.rate, "rate_bps": args.rate_bps,
                "repeats": args.repeats, "reference": args.reference,
                "reference_step_seconds": ref_step, "dilo_args": args.dilo_args,
                "variants": args.variants, "runs_dir": str(args.runs_dir)}
    write_json(args.out, document("bench_utilization", settings, rows))
    for r in rows:
        sr = r["sync_seconds_over_bytes_per_rate"]
        print(f"{r['variant']:12} utilization {100 * r['utilization']['median']:5.1f}%  "
              f"{r['tokens_per_second']['median']:8.0f} tok/s  "
              f"{r['bytes_sent_per_worker'] / 1e6:8.2f} MB/worker"
              + (f"  sync s / (bytes/rate): median worker {sr['median']:.2f}, last to arrive "
                 f"{r['min_worker_sync_seconds_over_bytes_per_rate']['median']:.2f}" if sr else ""))
    if picture:
        plot(rows, picture, f"{args.workers} workers, {netsim.format_rate(args.rate_bps)} links")
    print(f"bench_utilization: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_utilization"))
