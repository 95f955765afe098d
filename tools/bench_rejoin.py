"""What one stall costs a heal-mode worker: rejoining in-process against a process restart.

    flock /work/lead/heavy.lock python tools/bench_rejoin.py --out docs/results/rejoin.json \\
        --arm before=/work/main --arm after=. [--repeats 3] [--stall 20] [--steps 240] [--quick]

Each run: `python -m dilo.rendezvous_store` and 3 workers through the arm's checkout's
launch/heal_worker.sh (`run.failover heal`, configs/tiny.toml, one CPU thread each,
checkpoints off). When slot 1 has logged outer step `--at`, it is SIGSTOPped for `--stall`
seconds (more than comm.heartbeat: the others drop it) and SIGCONTed. Read from slot 1's
metrics JSONL (the same file across a restart):

  missed_rounds      outer steps the group applied without slot 1: the first outer step it
                     logs a sync for after SIGCONT, minus the last one before SIGSTOP, minus 1;
                     if it never synced again before the run ended (`came_back` false): every
                     outer step after the last one before SIGSTOP
  back_after_s       seconds from SIGCONT to that first committed exchange (its sync line)
  back_on_s          seconds from SIGCONT to its `rejoin` event (in-process) or to the `start`
                     event of its new process (restart): when it is ready to join again
  state_after_s      seconds from SIGCONT to its `resume` event (`how = live`): admitted, and
                     the global state downloaded from a member
  starts             `start` events of slot 1 (1: it rejoined in-process; 2: it restarted)
  how                `in_process` if slot 1 logged a `rejoin` event, else `restart`

and whether every summary holds the same final hash. Arms run interleaved (`--repeats`
times); the JSON holds every run and, per arm, each number's median, min and max
(`--quick`: one repeat of a shorter run). The machine has 2 cores shared
by the 3 workers (and by other jobs): a restart's start-up (Python, torch, the model) is
slower here than on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.chaos_cluster import free_port, is_worker, signal_quietly  # noqa: E402
from tools.proctree import descendants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config", str(REPO / "configs" / "tiny.toml"), "--checkpoint.every", "0", "--metrics.progress", "off",
         "--data.max_bytes", "1000000", "--data.eval_batches", "4", "--comm.timeout", "60"]


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def one_run(repo: Path, work: Path, args: argparse.Namespace) -> dict:
    run = work / "run"
    port = free_port()
    env = {**os.environ, "STORE": f"127.0.0.1:{port}", "WORKERS": "3", "LOCAL_WORKERS": "3",
           "PYTHON": sys.executable, "RESTART_DELAY": "1"}
    store = subprocess.Popen([sys.executable, "-m", "dilo.rendezvous_store", "--host", "127.0.0.1", "--port",
                              str(port)], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
    loops = []
    try:
        time.sleep(1)
        for s in range(3):
            with open(work / f"w{s}.log", "w") as log:
                loops.append(subprocess.Popen(
                    ["bash", str(repo / "launch" / "heal_worker.sh"), *TRAIN, "--run.steps", str(args.steps),
                     "--comm.heartbeat", str(args.heartbeat), "--run.dir", str(run)],
                    cwd=repo, env={**env, "SLOT": str(s), "LOCAL_SLOT": str(s)}, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
        mine = run / "metrics-1.jsonl"
        deadline = time.monotonic() + 600
        while max((r["outer_step"] for r in records(mine) if r["kind"] == "sync"), default=0) < args.at:
            if time.monotonic() > deadline or any(p.poll() is not None for p in loops):
                raise RuntimeError(f"slot 1 never reached outer step {args.at}; see {work}")
            time.sleep(0.05)
        worker = next(p for p in descendants(loops[1].pid) if is_worker(p))
        signal_quietly(worker, signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(args.stall)
        signal_quietly(worker, signal.SIGCONT)
        resumed_at = time.time()
        codes = [p.wait(timeout=900) for p in loops]
    finally:
        for p in [*loops, store]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rs = records(mine)
    syncs = [r for r in rs if r["kind"] == "sync"]
    before = max(r["outer_step"] for r in syncs if r["time"] < stopped_at)
    first = min((r for r in syncs if r["time"] > resumed_at), key=lambda r: r["time"], default=None)
    last = max((r["outer_step"] for f in run.glob("metrics-*.jsonl") for r in records(f) if r["kind"] == "sync"),
               default=before)
    finals = {json.loads(p.read_text())["global_hash"] for p in run.glob("summary-*.json")}
    events = [r for r in rs if r["kind"] == "event"]

    def after(names: tuple[str, ...], how: str | None = None) -> float | None:
        times = [e["time"] for e in events if e["event"] in names and e["time"] > resumed_at
                 and (how is None or e.get("how") == how)]
        return round(min(times) - resumed_at, 2) if times else None
    return {"exit_codes": codes, "stalled_at_outer_step": before,
            "came_back": first is not None,
            "missed_rounds": last - before if first is None else first["outer_step"] - before - 1,
            "back_after_s": None if first is None else round(first["time"] - resumed_at, 2),
            "back_on_s": after(("rejoin", "start")), "state_after_s": after(("resume",), "live"),
            "starts": sum(e["event"] == "start" for e in events),
            "how": "in_process" if any(e["event"] == "rejoin" for e in events) else "restart",
            "one_final_hash": len(finals) == 1 and len(list(run.glob("summary-*.json"))) == 3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=CHECKOUT (its launch/heal_worker.sh runs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--at", type=int, default=3, help="stall slot 1 once it logged this outer step")
    p.add_argument("--stall", type=float, default=20.0, help="seconds between SIGSTOP and SIGCONT")
    p.add_argument("--heartbeat", type=float, default=5.0, help="comm.heartbeat")
    p.add_argument("--quick", action="store_true", help="one repeat, 160 steps, a 15 s stall")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps, args.stall = 1, 160, 15.0
    arms = dict(a.split("=", 1) for a in args.arm)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for rep in range(args.repeats):
        for name, checkout in arms.items():
            with tempfile.TemporaryDirectory(prefix=f"rejoin-{name}-") as work:
                r = one_run(Path(checkout).resolve(), Path(work), args)
            print(f"repeat {rep} {name}: {r}", flush=True)
            runs[name].append(r)

    def spread(name: str, key: str) -> dict | None:
        values = [r[key] for r in runs[name] if r[key] is not None]
        return {"n": len(values), "median": statistics.median(values), "min": min(values),
                "max": max(values)} if values else None
    out = {"command": "python " + " ".join(sys.argv), "config": TRAIN, "steps": args.steps, "stall_s": args.stall,
           "heartbeat_s": args.heartbeat, "at_outer_step": args.at, "arms": arms, "runs": runs,
           "summary": {n: {k: spread(n, k) for k in ("missed_rounds", "back_on_s", "state_after_s", "back_after_s")}
                       for n in arms},
           "machine": "2 shared CPU cores, 3 workers with one thread each; other jobs ran too"}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"]))


if __name__ == "__main__":
    main()
