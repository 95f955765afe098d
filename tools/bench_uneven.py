"""Uneven workers: rounds of H steps against rounds of T seconds when one worker is slow.

    flock /work/lead/heavy.lock python tools/bench_uneven.py --out docs/results/uneven.json \\
        --plot docs/img/uneven.png [--workers 4] [--slow 3:2] [--steps 1200] [--H 50] [--repeats 3]

Each arm is one torchrun run of `--workers` one-thread workers on a shrunk tiny model
(`MODEL`), with `--run.slowdown` making one worker `factor` times slower (it sleeps
factor − 1 times each of its inner steps: half speed with 2). Every arm trains on the same
token budget: `--run.steps` inner steps per worker on average (with rounds by time the
group's progress, docs/uneven.md). Arms (`ARMS`):

  fixed_H       outer.inner_steps H (outer.weighting tokens only so that the exchanges carry
                the round reports the idle times are read from; with equal rounds every
                weight is 1 and the bytes are those of the plain mean)
  time_tokens   outer.sync_every_seconds T, weighted by tokens
  time_equal    outer.sync_every_seconds T, every Δ counted the same

T is calibrated so that the fast workers take about H steps per round: a short single run
measures the fast workers' step time under the same load (`--calibrate-steps`), or pass
`--T`. Per worker: utilization = compute_seconds / loop_seconds (the slow worker's sleep
counts as its compute), idle seconds at the exchanges (from the round reports), inner
steps. Per arm: wall time of the training loop, the eval loss curve against wall time
(worker 0's JSONL, every `--eval-every` outer steps), the time to reach `--target` (default:
the fixed-H arm's final eval loss) and the loss at the wall time the fastest arm ended.
The arms run interleaved `--repeats` times (arm order rotated each time); the JSON holds
every run and, per arm, the median and range of each number over the repeats (the target
is the median of the fixed-H runs' final losses; the loss at equal wall time is read per
repeat at the end of that repeat's fastest arm). The machine has 2 cores that the workers
share (4 workers: half a core each) and it is shared with other jobs; a "half-speed"
worker still is one, since it sleeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.seq_len", "64",
         "--data.batch_size", "8", "--data.eval_batches", "4", "--data.max_bytes", "2000000",
         "--inner.warmup_steps", "20"]
ARMS = ("fixed_H", "time_tokens", "time_equal")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, args: argparse.Namespace, extra: list[str], steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.workers),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dilo.train",
           "--config", str(REPO / "configs" / "tiny.toml"), *MODEL, "--run.dir", str(run_dir),
           "--run.steps", str(steps), "--run.slowdown", args.slow, "--checkpoint.every", "0",
           "--data.eval_every", str(args.eval_every), "--metrics.progress", "off", "--run.threads", "1",
           *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir / "log.txt", "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=args.timeout).returncode
    if rc != 0:
        raise SystemExit(f"{run_dir.name}: torchrun exited {rc}; see {run_dir / 'log.txt'}")
    return load(run_dir, args.workers, time.time() - start)


def load(run_dir: Path, workers: int, process_seconds: float | None = None) -> dict:
    """A finished run's summaries and JSONL records (also for --from-runs)."""
    summaries = [json.loads(p.read_text()) for p in sorted(run_dir.glob("summary-*.json"))]
    records = [[json.loads(line) for line in (run_dir / f"metrics-{w}.jsonl").read_text().splitlines()]
               for w in range(workers)]
    return {"summaries": summaries, "records": records, "process_seconds": process_seconds}


def eval_seconds(records: list) -> float:
    """Seconds the loop spent evaluating: each in-loop `eval` record's time minus the record
    before it (the sync step's lines); the last one (after the loop, in finish) is left out."""
    total, previous = 0.0, None
    evals = [i for i, r in enumerate(records) if r["kind"] == "eval" and "eval_loss" in r]
    for i in evals[:-1]:
        previous = records[i - 1]["time"] if i > 0 else records[i]["time"]
        total += records[i]["time"] - previous
    return total


def step_seconds(result: dict, worker: int) -> float:
    s = result["summaries"][worker]
    return s["compute_seconds"] / s["inner_steps"]


def arm_report(name: str, result: dict, slow: int) -> dict:
    summaries, records = result["summaries"], result["records"]
    t0 = next(r["time"] for r in records[0] if r["kind"] == "event" and r.get("event") == "start")
    loop_start = min(r["time"] for r in records[0] if r["kind"] in ("inner", "sync"))
    curve = [(round(r["time"] - t0, 3), r["eval_loss"]) for r in records[0]
             if r["kind"] == "eval" and "eval_loss" in r]
    workers = []
    for w, s in enumerate(summaries):
        syncs = [r for r in records[w] if r["kind"] == "sync"]
        evals = eval_seconds(records[w])
        workers.append({"worker": w, "slow": w == slow, "inner_steps": s["inner_steps"],
                        "utilization": s["compute_seconds"] / s["loop_seconds"],
                        "utilization_without_evals": s["compute_seconds"] / (s["loop_seconds"] - evals),
                        "compute_seconds": s["compute_seconds"], "loop_seconds": s["loop_seconds"],
                        "idle_seconds": s["idle_seconds"], "sync_seconds": s["sync_seconds"],
                        "eval_seconds": evals, "digest_seconds": s["digest_seconds"],
                        "outer_apply_seconds": s["outer_apply_seconds"],
                        "mean_weight": sum(r["weight"] for r in syncs) / max(1, len(syncs))})
    fast = [x for x in workers if not x["slow"]]
    return {"arm": name, "outer_steps": summaries[0]["outer_steps"], "final_eval_loss": summaries[0]["final_eval_loss"],
            "global_hashes": len({s["global_hash"] for s in summaries}), "startup_seconds": loop_start - t0,
            "loop_seconds": max(s["loop_seconds"] for s in summaries), "curve": curve, "workers": workers,
            "fast_utilization_min": min(x["utilization"] for x in fast),
            "fast_utilization_mean": sum(x["utilization"] for x in fast) / len(fast),
            "fast_utilization_without_evals": sum(x["utilization_without_evals"] for x in fast) / len(fast),
            "group_tokens": summaries[0]["group_tokens"], "process_seconds": result["process_seconds"]}


def time_to(curve: list, target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def loss_at(curve: list, when: float) -> float | None:
    """The last evaluated loss at or before `when` (seconds since the start event)."""
    before = [loss for t, loss in curve if t <= when]
    return before[-1] if before else None


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for arm in result["runs"]:
        t, loss = zip(*arm["curve"]) if arm["curve"] else ((), ())
        line, = a.plot(t, loss, marker=".", lw=0.8, ms=3, color=colors.get(arm["arm"]),
                       label=None if arm["arm"] in colors else arm["arm"])
        colors[arm["arm"]] = line.get_color()
    if result["target"] is not None:
        a.axhline(result["target"], color="grey", lw=0.8, ls="--", label="target")
    a.set_xlabel("wall seconds since start"), a.set_ylabel("eval loss"), a.legend()
    a.set_title(f"{result['workers']} workers, worker {result['slow_worker']} at 1/{result['slow_factor']:g} speed")
    names = list(result["arms"])
    width = 0.8 / result["workers"]
    for w in range(result["workers"]):
        util = [statistics.median(r["workers"][w]["utilization"] for r in result["runs"] if r["arm"] == name)
                for name in names]
        b.bar([i + w * width for i in range(len(names))], util, width,
              label=f"worker {w}{' (slow)' if w == result['slow_worker'] else ''}")
    b.axhline(0.95, color="grey", lw=0.8, ls="--")
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    b.set_ylabel("compute / loop seconds (median)"), b.set_ylim(0, 1.05), b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/uneven.json")
    p.add_argument("--plot", default="docs/img/uneven.png")
    p.add_argument("--root", default="/tmp/dilo-bench-uneven")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slow", default="3:2", help="run.slowdown: worker:factor")
    p.add_argument("--steps", type=int, default=1200, help="inner steps per worker (on average)")
    p.add_argument("--H", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--T", type=float, default=0.0, help="round seconds (0: calibrated to H fast steps)")
    p.add_argument("--calibrate-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--from-runs", default="", help="re-read the runs of an earlier invocation (its --root "
                   "time-stamped folder) instead of training; the other options must be the same")
    args = p.parse_args()
    slow_worker, slow_factor = int(args.slow.split(":")[0]), float(args.slow.split(":")[1])
    root = Path(args.from_runs) if args.from_runs else Path(args.root) / time.strftime("%Y%m%d-%H%M%S")
    T = args.T
    calibration = None
    if T <= 0:  # the fast workers' step time under the same load, rounds of H steps
        cal = (load(root / "calibrate", args.workers) if args.from_runs else
               train(root / "calibrate", args, ["--outer.inner_steps", str(args.H)], args.calibrate_steps))
        fast = [step_seconds(cal, w) for w in range(args.workers) if w != slow_worker]
        calibration = sum(fast) / len(fast)
        T = round(args.H * calibration, 3)
        print(f"calibration: fast step {calibration * 1e3:.1f} ms -> T = {T} s", flush=True)
    extra = {"fixed_H": ["--outer.inner_steps", str(args.H), "--outer.weighting", "tokens"],
             "time_tokens": ["--outer.inner_steps", "0", "--outer.sync_every_seconds", str(T),
                             "--outer.weighting", "tokens"],
             "time_equal": ["--outer.inner_steps", "0", "--outer.sync_every_seconds", str(T)]}
    names = args.arms.split(",")
    runs = []
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            print(f"repeat {repeat}: running {name} ...", flush=True)
            run_dir = root / f"{name}-{repeat}"
            done = load(run_dir, args.workers) if args.from_runs else train(run_dir, args, extra[name], args.steps)
            a = arm_report(name, done, slow_worker)
            a["repeat"] = repeat
            runs.append(a)
            print(f"  {name}: loop {a['loop_seconds']:.1f} s, final eval {a['final_eval_loss']:.4f}, fast util "
                  f"{a['fast_utilization_mean']:.3f} (min {a['fast_utilization_min']:.3f}), hashes "
                  f"{a['global_hashes']}", flush=True)
    fixed = [a["final_eval_loss"] for a in runs if a["arm"] == "fixed_H"]
    target = args.target if args.target is not None else (statistics.median(fixed) if fixed else None)
    for repeat in range(args.repeats):
        mine = [a for a in runs if a["repeat"] == repeat]
        first_end = min(a["curve"][-1][0] for a in mine if a["curve"])
        for a in mine:
            a["first_end_seconds"] = first_end
            a["seconds_to_target"] = time_to(a["curve"], target) if target is not None else None
            a["loss_at_first_end"] = loss_at(a["curve"], first_end)
    keys = ("loop_seconds", "seconds_to_target", "loss_at_first_end", "final_eval_loss",
            "fast_utilization_mean", "fast_utilization_min", "fast_utilization_without_evals", "outer_steps")
    arms = {name: {k: spread([a[k] for a in runs if a["arm"] == name]) for k in keys} for name in names}
    for name in names:
        mine = [a for a in runs if a["arm"] == name]
        arms[name]["fast_idle_fraction"] = spread([statistics.mean(w["idle_seconds"] / w["loop_seconds"]
                                                                    for w in a["workers"] if not w["slow"])
                                                   for a in mine])
        arms[name]["one_global_hash"] = all(a["global_hashes"] == 1 for a in mine)
    command = " ".join(["python", "tools/bench_uneven.py", *sys.argv[1:]])
    result = {"command": command, "runs_folder": str(root),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs; "
                         f"{args.workers} workers of 1 thread share them",
              "model": " ".join(MODEL), "workers": args.workers, "slow_worker": slow_worker,
              "slow_factor": slow_factor, "steps_per_worker": args.steps, "H": args.H, "T": T,
              "fast_step_seconds_calibrated": calibration, "eval_every_outer_steps": args.eval_every,
              "target": target, "repeats": args.repeats, "arms": arms, "runs": runs,
              "note": "utilization = compute_seconds / loop_seconds (the slow worker's sleep is its compute); "
                      "the loop includes the evaluations; the codec's kernels load before it (Codec.warm_up "
                      "in DiLoCo's constructor, not in the first exchange); idle = waiting at the exchanges for "
                      "the last member (round reports)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, Path(args.plot))
    for name, a in arms.items():
        med = {k: (v["median"] if isinstance(v, dict) else None) for k, v in a.items()}
        print(f"{name:12s} loop {med['loop_seconds']:6.1f} s  to target {med['seconds_to_target']}  "
              f"loss at the fastest arm's end {med['loss_at_first_end']}  fast util {med['fast_utilization_mean']:.3f}"
              f"  fast idle {med['fast_idle_fraction']:.3f}  (medians of {args.repeats})")


if __name__ == "__main__":
    main()
