"""Chaos test: faults cost time, never correctness.

    python tools/chaos.py --config configs/tiny.toml --workers 4 --faults 20 --seed 0 \\
        --out chaos.json [--nodes 2] [--no-plot] [--section.key VALUE ...]

Runs the same multi-worker training twice on this machine, as `--nodes` simulated nodes
(elastic torchrun agents, launch/torchrun_elastic.sh, `--workers / --nodes` workers each):
once without faults (the reference) and once with `--faults` faults injected on a schedule
drawn from `--seed`. Kinds (`--kinds`, default all):

  kill_worker         SIGKILL one worker process
  kill_node           SIGKILL a node's agent and all its workers; once the survivors have
                      trained an outer step without it (or after 60 s), the node rejoins
                      with a fresh agent, recorded as `rejoin`: a shrink, then a grow
  kill_in_checkpoint  SIGKILL a worker while it writes a checkpoint (caught by watching for
                      its temporary file; `mid_write` says whether the kill landed there)
  stall               SIGSTOP a worker for comm.timeout + 5 s (its peers time out), then SIGCONT
  liar                from then on, one worker (a random rank) sends poisoned pseudo-gradients,
                      one of `--poison` (default all of tools/poison.py's KINDS: scaled x1000,
                      sign -10x, noise 100x its norm, inf, nan); not in the default --kinds.
                      Its workers start with tools/poison_site on PYTHONPATH, whose
                      sitecustomize installs tools/poison.py's hook; the fault writes the
                      order (kind, rank) to <run dir>/poison-order.json. A test harness: the
                      run goes on, and the report says what the liar did to the loss

Fault i fires once training has reached a randomly drawn outer step and the current world
has completed an outer step since the previous disruption (so every fault hits a running
world), at a random moment within the following round (kill_in_checkpoint waits for a
checkpoint write instead). With `--backend heal` (run.failover = heal: one
launch/heal_worker.sh per worker, survivors never restart) a disruption is a `heal`,
`admit` or `start` event in the metrics, not a new world (tools/chaos_timeline.py). An agent that exits with an error on its own is restarted, as a cluster scheduler
would, and recorded as `agent_restart` (not counted as a fault).

The JSON holds faults_injected, survived, hash_mismatches (outer steps where members of
one world logged different global hashes, plus divergence errors), nonfinite_steps,
final_eval_loss, reference_eval_loss, loss_ratio, loss_within_usual_ratio (within
chaos_report.USUAL_LOSS_RATIO of the reference), poisoned_rounds (rounds a liar poisoned),
wall_seconds, reference_wall_seconds and more (see `summarize`); the PNG shows both loss
curves with the faults marked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos_cluster import CLUSTERS, Cluster  # noqa: E402
from chaos_report import plot, summarize  # noqa: E402
from chaos_timeline import Timeline  # noqa: E402
from poison import KINDS as POISON_KINDS  # noqa: E402

from dilo.config import parse_args  # noqa: E402

FAULT_KINDS = ("kill_worker", "kill_node", "kill_in_checkpoint", "stall", "liar")
DEFAULT_KINDS = ("kill_worker", "kill_node", "kill_in_checkpoint", "stall")
"""The liar is asked for by name: its faults change the result on purpose."""
POISON_SITE = Path(__file__).resolve().parent / "poison_site"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="Inject faults into a multi-worker run and compare "
                                "it with a fault-free reference. Unknown --section.key VALUE "
                                "options go to dilo.train.")
    p.add_argument("--config", required=True, help="TOML preset for dilo.train")
    p.add_argument("--workers", type=int, default=4, help="DiLoCo workers in all (default 4)")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes (torchrun agents), default 2")
    p.add_argument("--faults", type=int, default=5, help="faults to inject (default 5)")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma-separated fault kinds (default {','.join(DEFAULT_KINDS)}; also: liar)")
    p.add_argument("--poison", default=",".join(POISON_KINDS),
                   help="comma-separated lies a liar fault draws from (tools/poison.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--plot", default="", help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (matplotlib not needed)")
    p.add_argument("--run-dir", default="", help="where both runs go (default: next to --out)")
    p.add_argument("--timeout", type=float, default=20.0, help="comm.timeout of the workers, s")
    p.add_argument("--last-fault-at", type=float, default=0.8,
                   help="faults fire before this fraction of the outer steps (default 0.8)")
    p.add_argument("--max-wall", type=float, default=1800.0, help="give up after this many s per run")
    p.add_argument("--backend", default="torch", help=f"cluster backend: {', '.join(CLUSTERS)} (heal: the "
                   "torch backend with run.failover = heal, one launch/heal_worker.sh per worker)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the fault-free run (no loss_ratio; for quick checks)")
    args, train_args = p.parse_known_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        p.error(f"--kinds: unknown {bad}; choose from {', '.join(FAULT_KINDS)}")
    poisons = [k for k in args.poison.split(",") if k]
    if not poisons or any(k not in POISON_KINDS for k in poisons):
        p.error(f"--poison: {args.poison!r}; choose from {', '.join(POISON_KINDS)}")
    args.poison = poisons
    if args.nodes < 1 or args.workers < 1 or args.workers % args.nodes:
        p.error(f"--workers ({args.workers}) must be a positive multiple of --nodes ({args.nodes})")
    if args.nodes < 2 and "kill_node" in kinds:
        kinds.remove("kill_node")  # the last node's death is the end of the job, not a fault
    if args.backend == "heal" and "liar" in kinds:
        p.error("--kinds liar does not apply to --backend heal: tools/poison.py's hook picks the liar by "
                "torchrun's RANK, which heal workers (one process each, no torchrun) do not have")
    if args.backend not in CLUSTERS:
        p.error(f"--backend {args.backend}: no cluster for it yet; one of {', '.join(CLUSTERS)} "
                "(add a Cluster subclass in tools/chaos_cluster.py)")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("matplotlib is not installed: pip install matplotlib, or pass --no-plot")
    args.kinds = kinds
    return args, train_args


class MetricsTail:
    """New JSON lines of every metrics-*.jsonl in a run dir, read incrementally."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.offsets = run_dir, {}

    def poll(self) -> list[dict]:
        out = []
        for path in self.run_dir.glob("metrics-*.jsonl"):
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out


def temporary_files(run_dir: Path) -> set[str]:
    found = set()
    try:
        for step in os.scandir(run_dir / "checkpoints"):
            found.update(e.path for e in os.scandir(step.path)
                         if e.name.startswith(".worker-") and e.name.endswith(".tmp"))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def catch_checkpoint_write(run_dir: Path, writers: set[int], deadline: float) -> tuple[int, str] | None:
    """Poll for a new checkpoint temporary file of one of `writers` (pids; the writer is the
    one holding it open); (pid, path) or None by the deadline. Files left by earlier kills
    are ignored."""
    stale = temporary_files(run_dir)
    while time.time() < deadline:
        new = temporary_files(run_dir) - stale
        if new:
            for pid in writers:
                try:
                    held = {f.path for f in psutil.Process(pid).open_files()}
                except psutil.Error:  # gone, or not ours to inspect
                    continue
                if held & new:
                    return pid, next(iter(held & new))
        time.sleep(0.0005)
    return None


def order_lie(run_dir: Path, rank: int, poison: str) -> None:
    """Tell tools/poison.py's hook in the workers which rank lies, and how (atomically)."""
    tmp = run_dir / ".poison-order.json.tmp"
    tmp.write_text(json.dumps({"kind": poison, "rank": rank}))
    os.replace(tmp, run_dir / "poison-order.json")


def inject(kind: str, cluster: Cluster, rng: random.Random, run_dir: Path, timeout: float,
           alive: list[int], poisons: list[str] = ()) -> dict:
    """Do one fault; returns its record (kind, pids, ...)."""
    if kind == "liar":
        ranks = sum(len(cluster.workers(n)) for n in alive)
        if not ranks:
            return {"kind": kind, "skipped": "no live worker"}
        rank, poison = rng.randrange(ranks), rng.choice(list(poisons))
        order_lie(run_dir, rank, poison)
        return {"kind": kind, "rank": rank, "poison": poison}
    if kind == "kill_node":
        node = rng.choice(alive)
        return {"kind": kind, "node": node, "pids": cluster.kill_node(node)}
    workers = [(n, p) for n in alive for p in cluster.workers(n)]
    if not workers:
        return {"kind": kind, "skipped": "no live worker"}
    node, pid = rng.choice(workers)
    if kind == "kill_worker":
        cluster.kill_worker(pid)
        return {"kind": kind, "node": node, "pids": [pid]}
    if kind == "stall":
        cluster.stall(pid)
        return {"kind": kind, "node": node, "pids": [pid], "until": time.time() + timeout + 5}
    caught = catch_checkpoint_write(run_dir, {p for _, p in workers}, time.time() + 30)
    if caught is None:  # no write seen: kill at a random moment instead, and say so. The wait
        # was up to 30 s: the worker picked before it may have exited and been restarted since
        # (a new pid), so pick among the workers alive now.
        workers = [(n, p) for n in alive for p in cluster.workers(n)]
        if not workers:
            return {"kind": kind, "skipped": "no live worker"}
        node, pid = rng.choice(workers)
        cluster.kill_worker(pid)
        return {"kind": kind, "node": node, "pids": [pid], "mid_write": False}
    writer, tmp = caught
    cluster.kill_worker(writer)
    return {"kind": kind, "pids": [writer], "file": tmp, "mid_write": os.path.exists(tmp)}


def run_once(cluster: Cluster, run_dir: Path, schedule: list[tuple[str, int]], rng: random.Random,
             timeout: float, max_wall: float, poisons: list[str] = (), last_outer: int = 0,
             heal: bool = False) -> dict:
    """Start every node, inject the schedule, wait for the end. Returns the raw timeline.

    `heal`: the workers run with run.failover = heal (disruptions are read from heal and
    admit events, tools/chaos_timeline.py). No fault fires once the run is in its last round (`last_outer` − 1 outer steps done): one
    landing after a node's workers finished would end that node for good (its agent exits
    after the job succeeded) and leave the others in torchrun's exit barrier."""
    tail, timeline = MetricsTail(run_dir), Timeline(heal=heal)
    start = time.time()
    for node in range(cluster.num_nodes):
        cluster.start_node(node)
    faults: list[dict] = []
    events: list[dict] = []
    rejoin_at: dict[int, tuple[str, float]] = {}  # node -> (world it left, latest rejoin time)
    stalled: dict | None = None
    last_disruption, index = start, 0
    expect_change = False  # the last disruption changes the membership (the start and a liar do not)
    fire_at = None  # when the next fault fires
    finished = False
    while True:
        now = time.time()
        if now - start > max_wall:
            events.append({"kind": "gave_up", "time": now - start})
            break
        for record in tail.poll():
            timeline.feed(record)
        progress, world = timeline.progress, timeline.world
        # the group has completed an outer step since the last disruption (chaos_timeline)
        running = timeline.running(last_disruption, expect_change)
        codes = {n: cluster.node_exit_code(n) for n in range(cluster.num_nodes)}
        finished = finished or any(code == 0 for code in codes.values())
        if finished and all(code is not None for n, code in codes.items() if n not in rejoin_at):
            break
        for node, code in codes.items():  # a crashed agent is restarted, as a scheduler would
            if code not in (None, 0) and node not in rejoin_at and not finished:
                events.append({"kind": "agent_restart", "node": node, "code": code, "time": now - start})
                cluster.start_node(node)
        if stalled and now >= stalled["until"]:
            for pid in stalled["pids"]:
                cluster.unstall(pid)
            stalled = None
        for node, (left, latest) in list(rejoin_at.items()):
            if timeline.moved_on(left, last_disruption) or now >= latest:
                del rejoin_at[node]
                if not finished:
                    cluster.start_node(node)
                    faults.append({"kind": "rejoin", "node": node, "time": now - start,
                                   "outer_step": progress})
                    last_disruption, expect_change = now, True
        alive = [n for n, code in codes.items() if code is None and n not in rejoin_at]
        running = running and timeline.last_sync > last_disruption  # a rejoin just now disrupts too
        due = (index < len(schedule) and not stalled and not finished and alive
               and progress >= schedule[index][1] and running
               and (not last_outer or progress < last_outer - 1))
        if not due:
            fire_at = None
        elif fire_at is None:  # not right after the sync: anywhere in the round
            fire_at = now + (0 if schedule[index][0] == "kill_in_checkpoint"
                             else rng.uniform(0, timeline.round_seconds))
        if due and now >= fire_at:
            fire_at = None
            kind = schedule[index][0]
            if kind == "kill_node" and len(alive) < 2:
                kind = "kill_worker"  # never the last node: that ends the job
            record = inject(kind, cluster, rng, run_dir, timeout, alive, poisons)
            record.update(time=time.time() - start, outer_step=progress, scheduled=schedule[index][0])
            faults.append(record)
            index += 1
            # a skipped fault (no live worker) changes nothing: do not wait for a heal
            last_disruption, expect_change = time.time(), kind != "liar" and "skipped" not in record
            if kind == "kill_node":
                rejoin_at[record["node"]] = (world, time.time() + 60)
            if kind == "stall":
                stalled = record
        cluster.reap()
        time.sleep(0.05)
    return {"wall_seconds": time.time() - start, "start_time": start, "faults": faults,
            "events": events, "exit_codes": [cluster.node_exit_code(n) for n in range(cluster.num_nodes)]}


def make_schedule(rng: random.Random, count: int, kinds: list[str], total_outer: int,
                  last_fraction: float = 0.8) -> list[tuple[str, int]]:
    """`count` (kind, outer step to wait for), spread over the first `last_fraction` of the run.

    Every kind appears at least once when `count` allows; the rest are drawn at random.
    """
    drawn = kinds[:count] + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(drawn)
    last = max(1, int(last_fraction * total_outer))
    return list(zip(drawn, sorted(rng.randint(1, last) for _ in range(count))))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    run_root = Path(args.run_dir) if args.run_dir else out.with_suffix("")
    train_args = ["--config", args.config, "--checkpoint.every", "1", "--metrics.progress", "off",
                  "--comm.backend", "torch" if args.backend == "heal" else args.backend, *extra,
                  "--comm.timeout", str(args.timeout)]
    try:
        cfg = parse_args(train_args)
    except ValueError as e:
        print(f"chaos: bad training options: {e}", file=sys.stderr)
        return 2
    if cfg.checkpoint.every < 1:
        print("chaos: checkpoint.every must be >= 1 (faults resume from checkpoints)", file=sys.stderr)
        return 2
    total_outer = math.ceil(cfg.run.steps / cfg.outer.inner_steps)
    rng = random.Random(args.seed)
    schedule = make_schedule(rng, args.faults, args.kinds, total_outer, args.last_fault_at)

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runs = {}
    for name, plan in (("reference", []), ("chaos", schedule))[args.no_reference:]:
        run_dir = run_root / name
        if run_dir.exists() and any(run_dir.iterdir()):
            print(f"chaos: {run_dir} is not empty; pass another --run-dir", file=sys.stderr)
            return 2
        liar_env = {}
        if any(kind == "liar" for kind, _ in plan):
            liar_env = {"PYTHONPATH": f"{POISON_SITE}{os.pathsep}{Path(__file__).resolve().parents[1]}",
                        "DILO_POISON_FILE": str(run_dir.resolve() / "poison-order.json")}
        cluster = CLUSTERS[args.backend](run_dir, args.nodes, args.workers // args.nodes,
                                         [*train_args, "--run.dir", str(run_dir)], run_dir / "logs",
                                         extra_env=liar_env)
        try:
            print(f"chaos: {name} run in {run_dir} ({len(plan)} faults)", flush=True)
            runs[name] = run_once(cluster, run_dir, plan, rng, args.timeout, args.max_wall, args.poison,
                                  last_outer=total_outer, heal=args.backend == "heal")
        finally:
            cluster.close()
    result = summarize(run_root, runs, cfg, args, schedule)
    if not args.no_plot:
        result["plot"] = str(plot(run_root, runs, Path(args.plot or out.with_suffix(".png"))))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("faults_injected", "survived", "hash_mismatches", "nonfinite_steps", "final_eval_loss",
            "reference_eval_loss", "loss_ratio", "loss_within_usual_ratio", "poisoned_rounds",
            "wall_seconds", "reference_wall_seconds")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
