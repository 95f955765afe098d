"""Sharded workers (run.shard = fsdp) against DDP islands: outer-state memory per rank,
bytes per rank per sync, outer-step time, eval loss and global hashes.

Each case is `WxS:shard` (W workers of S processes, `ddp` or `fsdp`), run with
`dilo.train --config configs/tiny.toml` (tools/bench_islands.py's runner) and read back
from every process's `sync` lines and the summaries:

    python tools/bench_shard.py --cases 2x1:ddp,2x2:ddp,2x2:fsdp,1x4:ddp,1x4:fsdp --steps 100 \
        --out docs/results/shard.json --png docs/img/shard.png

Per case: `outer_state_bytes` per rank (θ + outer momentum, the last sync), bytes sent per
rank per sync, the outer step's seconds (exchange + apply + digest, median over every
rank's syncs, pooled over `--repeats` interleaved rounds), the final eval loss, and whether every rank of every worker logged the same
global hash at every outer step. `eval_vs_ddp` is the eval-loss ratio against the DDP case
of the same layout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_islands import parse_layout, read_syncs, run_layout


def measure(run_dirs: list[Path]) -> dict:
    """One case over its repeats: sizes and hashes from each, times pooled, losses listed."""
    runs = [measure_one(d) for d in run_dirs]
    first = dict(runs[0])
    first["outer_step_seconds_median"] = statistics.median(t for r in runs for t in r.pop("_outer_seconds"))
    first["apply_seconds_median"] = statistics.median(t for r in runs for t in r.pop("_apply_seconds"))
    first.pop("_outer_seconds", None)
    first.pop("_apply_seconds", None)
    first["repeats"] = len(runs)
    first["final_eval_losses"] = [r["final_eval_loss"] for r in runs]
    first["hashes_agree"] = all(r["hashes_agree"] for r in runs)
    return first


def measure_one(run_dir: Path) -> dict:
    syncs = read_syncs(run_dir)
    per_rank = {name: recs for name, recs in syncs.items() if recs}
    by_step: dict[int, set] = {}
    for recs in per_rank.values():
        for r in recs:
            by_step.setdefault(r["outer_step"], set()).add(r["global_hash"])
    every = [r for recs in per_rank.values() for r in recs]
    summary = json.loads((run_dir / "summary-0.json").read_text())
    return {
        "processes": len(per_rank),
        "outer_steps": len(by_step),
        "outer_state_bytes_per_rank": sorted({recs[-1]["outer_state_bytes"] for recs in per_rank.values()}),
        "bytes_sent_per_rank_per_sync": statistics.median(r["bytes_sent"] for r in every),
        "intra_bytes_per_rank_per_sync": statistics.median(r["intra_bytes"] for r in every),
        "_outer_seconds": [r["seconds"] + r["apply_seconds"] + r["digest_seconds"] for r in every],
        "_apply_seconds": [r["apply_seconds"] for r in every],
        "syncs": len(every),
        "final_eval_loss": summary["final_eval_loss"],
        "hashes_agree": all(len(h) == 1 for h in by_step.values()),
        "global_hash": summary["global_hash"][:16],
    }


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    mem = [max(results[n]["outer_state_bytes_per_rank"]) / 2**20 for n in names]
    a.bar(names, mem, color=["tab:orange" if n.endswith("fsdp") else "tab:blue" for n in names])
    a.set_ylabel("θ + outer momentum per rank (MiB)")
    a.set_title("outer state per process (tiny model)")
    loss = [results[n]["final_eval_loss"] for n in names]
    b.bar(names, loss, color=["tab:orange" if n.endswith("fsdp") else "tab:blue" for n in names])
    b.set_ylim(min(loss) * 0.98, max(loss) * 1.01)
    b.set_ylabel("final eval loss")
    b.set_title("eval loss (orange: run.shard = fsdp)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="2x1:ddp,2x2:ddp,2x2:fsdp,1x4:ddp,1x4:fsdp",
                    help="comma-separated WxS:shard (default: S = 1, 2, 4 with their DDP islands)")
    ap.add_argument("--steps", type=int, default=100, help="inner steps per run (default 100, H = 20)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all cases (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--out", default="runs/bench-shard.json")
    ap.add_argument("--png", default="", help="also draw the memory and eval-loss bars here")
    args, extra = ap.parse_known_args()
    cases = {}
    for case in args.cases.split(","):
        layout, _, shard = case.partition(":")
        if shard not in ("ddp", "fsdp"):
            raise SystemExit(f"--cases: {case!r} needs :ddp or :fsdp")
        cases[case] = (*parse_layout(layout), shard)
    results, load = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        dirs: dict[str, list[Path]] = {case: [] for case in cases}
        for rnd in range(args.repeats):  # interleaved: each round runs every case once
            for case, (workers, size, shard) in cases.items():
                run_dir = Path(tmp) / f"{case.replace(':', '-')}-{rnd}"
                run_layout(workers, size, run_dir, args.steps, ["--run.shard", shard, *extra], args.timeout)
                dirs[case].append(run_dir)
                load.append(os.getloadavg()[0])
                print(case, rnd, "done", flush=True)
        for case, (workers, size, shard) in cases.items():
            results[case] = {"workers": workers, "worker_size": size, "shard": shard, **measure(dirs[case])}
            print(case, json.dumps(results[case]), flush=True)
    for case, res in results.items():
        twin = f"{res['workers']}x{res['worker_size']}:ddp"
        if res["shard"] == "fsdp" and twin in results:
            res["eval_vs_ddp"] = res["final_eval_loss"] / results[twin]["final_eval_loss"]
    out = {"command": " ".join(["python tools/bench_shard.py", *sys.argv[1:]]), "steps": args.steps,
           "config": "configs/tiny.toml", "repeats": args.repeats,
           "machine": {"cpus": os.cpu_count(), "load_average": [min(load), statistics.median(load), max(load)],
                       "shared": "2-core machine shared with other engineers' runs"},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.png:
        plot(results, args.png)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
