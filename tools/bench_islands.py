"""Per-rank outer traffic and sync time for several worker layouts of the same processes.

    nice -n 10 python tools/bench_islands.py --steps 100 --out runs/bench-islands.json
    nice -n 10 python tools/bench_islands.py --layouts 4x1,2x2,2x1 --repeats 2 -- --comm.codec fp32

A layout WxS is W DiLoCo workers of S processes each (`--run.worker_size S`, W x S
processes under torchrun). Every layout runs `dilo.train` on configs/tiny.toml (plus
the arguments after `--`), in rounds: each round runs every layout once, so drift in
machine load hits them alike. Read back from every process's metrics file:

* `bytes_sent_per_sync`: what one process puts on the inter-worker links per outer step
  (identical on every process and sync: the byte counts are exact);
* `intra_bytes_per_sync`: what it receives from the other processes of its worker;
* `sync_seconds_median`: median over every sync of every process of every round.

Writes one JSON file; ratios are against the first layout, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.proctree import descendants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (torchrun starts workers in sessions of their own,
    so its process group does not hold them)."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def parse_layout(text: str) -> tuple[int, int]:
    try:
        workers, size = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layouts: {text!r} is not WxS (e.g. 2x2 = 2 workers of 2 processes)")
    if workers < 1 or size < 1:
        raise SystemExit(f"--layouts: {text!r} needs W >= 1 and S >= 1")
    return workers, size


def run_layout(workers: int, size: int, run_dir: Path, steps: int, extra: list[str],
               timeout: float) -> None:
    nproc = workers * size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "dilo.train", "--config", str(REPO / "configs" / "tiny.toml"),
           "--run.dir", str(run_dir), "--run.steps", str(steps), "--run.worker_size", str(size),
           "--metrics.progress", "off", "--run.threads", "1", "--checkpoint.every", "0", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = run_dir.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:  # timeout or Ctrl-C: end torchrun and every worker under it
            kill_tree(proc.pid)
            proc.wait(timeout=30)
            raise
    if rc != 0:
        raise SystemExit(f"{workers}x{size} failed (exit {rc}); see {log}:\n{log.read_text()[-2000:]}")


def read_syncs(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(run_dir.glob("metrics-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.stem.removeprefix("metrics-")] = [r for r in records if r["kind"] == "sync"]
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="4x1,2x2", help="comma-separated WxS (default 4x1,2x2)")
    ap.add_argument("--steps", type=int, default=100, help="inner steps per run (default 100)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all layouts (default 1)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    ap.add_argument("--out", default="runs/bench-islands.json")
    args = ap.parse_args(argv)
    layouts = [parse_layout(t) for t in args.layouts.split(",")]

    samples = {f"{w}x{s}": {"sent": set(), "received": set(), "intra": set(), "seconds": [],
                            "syncs": 0, "processes": 0, "tokens": 0} for w, s in layouts}
    with tempfile.TemporaryDirectory(prefix="bench-islands-") as tmp:
        for rep in range(args.repeats):
            for workers, size in layouts:
                name = f"{workers}x{size}"
                run_dir = Path(tmp) / f"{name}-{rep}"
                print(f"round {rep + 1}/{args.repeats}: {name} ...", flush=True)
                run_layout(workers, size, run_dir, args.steps, extra, args.timeout)
                syncs = read_syncs(run_dir)
                acc = samples[name]
                acc["processes"] = len(syncs)
                for records in syncs.values():
                    acc["syncs"] = len(records)
                    acc["sent"].update(r["bytes_sent"] for r in records)
                    acc["received"].update(r["bytes_received"] for r in records)
                    acc["intra"].update(r.get("intra_bytes", 0) for r in records)
                    acc["seconds"] += [r["seconds"] for r in records]
                acc["tokens"] = sum(json.loads(p.read_text())["tokens"]
                                    for p in run_dir.glob("summary-*.json"))

    results = []
    for workers, size in layouts:
        acc = samples[f"{workers}x{size}"]
        if len(acc["sent"]) != 1:  # the two-phase exchange sends the same bytes every sync
            raise SystemExit(f"{workers}x{size}: per-process bytes differ across syncs: {acc['sent']}")
        results.append({
            "layout": f"{workers}x{size}", "workers": workers, "worker_size": size,
            "processes": acc["processes"], "syncs_per_process": acc["syncs"],
            "tokens_per_run": acc["tokens"],
            "bytes_sent_per_sync": acc["sent"].pop(), "bytes_received_per_sync": max(acc["received"]),
            "intra_bytes_per_sync": max(acc["intra"]),
            "sync_seconds_median": statistics.median(acc["seconds"]),
            "sync_seconds_samples": len(acc["seconds"]),
        })
    base = results[0]
    for r in results:
        r["bytes_ratio_vs_first"] = r["bytes_sent_per_sync"] / base["bytes_sent_per_sync"] \
            if base["bytes_sent_per_sync"] else None
        r["sync_seconds_ratio_vs_first"] = r["sync_seconds_median"] / base["sync_seconds_median"]
    report = {"steps": args.steps, "repeats": args.repeats, "extra_args": extra,
              "config": "configs/tiny.toml", "layouts": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'layout':>7} {'procs':>5} {'sent/sync/proc':>15} {'intra/sync/proc':>16} "
          f"{'sync s (median)':>16} {'bytes ratio':>11}")
    for r in results:
        print(f"{r['layout']:>7} {r['processes']:>5} {r['bytes_sent_per_sync']:>15,} "
              f"{r['intra_bytes_per_sync']:>16,} {r['sync_seconds_median']:>16.4f} "
              f"{r['bytes_ratio_vs_first'] or 0:>11.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
