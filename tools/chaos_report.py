"""What a chaos run proved: numbers from the metrics files, and the loss-curve picture.

Every worker of every world (one world per torchrun restart, named by the `world` field
of its sync and event lines) appends to run_dir/metrics-<rank>.jsonl. From those lines:

- hash_mismatches: (world, outer step) pairs whose members logged different global
  hashes in their sync lines, plus resumes where members of one world loaded different
  states, plus `diverged` events (a member's own hash check failed and it stopped);
- resumes_from_unseen_state: resumes whose (outer step, global hash) no earlier sync
  line and no save-on-failure produced, i.e. a state that training never reached (a
  failure in the hash check after an outer step saves that step's state before its sync
  line is written: such resumes are counted in resumes_from_failure_state);
- nonfinite_steps: inner, sync and eval lines whose loss is not a finite number;
- the final eval loss comes from the summaries of the world that finished;
  loss_within_usual_ratio: whether it is within USUAL_LOSS_RATIO of the reference's;
- poisoned_rounds: rounds in which a liar (tools/poison.py) sent a poisoned pseudo-gradient,
  from run_dir/poison-<rank>.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo.metrics import read_jsonl  # noqa: E402


USUAL_LOSS_RATIO = 1.10
"""The band a correct faulty run stays in: the final eval loss of the fault-free reference
(2 workers, tests.helpers.SMALL, 60 steps, H = 5) moves by up to 9.9% when only the initial
weights change (run.seed 0..4: 3.795, 3.631, 3.499, 3.757, 3.845; max/min = 1.099). An
elastic resume perturbs the trajectory less than a new init does; a resume from a wrong
or stale state, or a liar that got through, lands far outside it."""


def records(run_dir: Path) -> list[dict]:
    out = []
    for path in sorted(run_dir.glob("metrics-*.jsonl")):
        out += read_jsonl(path)
    return out


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def poisoned_rounds(run_dir: Path) -> int:
    """Rounds a liar poisoned (one line per round in run_dir/poison-<rank>.jsonl)."""
    return sum(len(read_jsonl(p)) for p in run_dir.glob("poison-*.jsonl"))


def final_summaries(run_dir: Path) -> list[dict]:
    """The summaries written by the last world that finished (newest files first)."""
    files = sorted(run_dir.glob("summary-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    found = [json.loads(p.read_text()) for p in files]
    if not found:
        return []
    world = found[0].get("world")
    return [s for s in found if s.get("world") == world]


def analyze(run_dir: Path, run_steps: int) -> dict:
    lines = records(run_dir)
    sync_hashes: dict[tuple, set] = defaultdict(set)
    sync_lines: dict[tuple, list] = defaultdict(list)  # (world, outer step) -> members' group sizes
    resume_hashes: dict[tuple, set] = defaultdict(set)
    seen: set[tuple] = set()
    failure_saved: set[tuple] = set()
    worlds: dict[str, dict] = {}
    epochs: dict[tuple, dict] = {}
    joins: list[dict] = []
    diverged = nonfinite = 0
    for r in lines:
        kind = r.get("kind")
        if kind == "sync":
            sync_hashes[(r.get("world"), r["outer_step"])].add(r["global_hash"])
            sync_lines[(r.get("world"), r["outer_step"])].append(r.get("peers"))
            seen.add((r["outer_step"], r["global_hash"]))
        if kind in ("inner", "sync") and not finite(r.get("loss")):
            nonfinite += 1
        if kind == "eval" and not finite(r.get("eval_loss")):
            nonfinite += 1
        if kind == "event" and r.get("event") == "checkpoint" and r.get("on_failure") and "global_hash" in r:
            failure_saved.add((r["outer_step"], r["global_hash"]))
        if kind == "event" and r.get("event") == "diverged":
            diverged += 1
        if kind == "event" and r.get("event") in ("heal", "admit"):  # heal mode; every member logs one
            epochs.setdefault((r["world"], r["epoch"]), {k: r.get(k) for k in (
                "world", "epoch", "event", "lost", "joined", "workers", "outer_step", "time")})
        if kind == "event" and r.get("event") == "resume":
            # (heal mode: joiners download the state at different outer steps of one world)
            resume_hashes[(r["world"], r["outer_step"])].add(r["global_hash"])
            seen_resume = {k: r[k] for k in ("world", "time", "outer_step", "global_hash")}
            if r["how"] == "live":
                joins.append(seen_resume)
                continue
        if kind == "event" and r.get("event") in ("start", "resume"):
            w = worlds.setdefault(r["world"], {"world": r["world"], "time": r["time"], "workers": r["workers"]})
            if r["event"] == "resume":
                w.update(how=r["how"], outer_step=r["outer_step"], written_by=r["written_by"],
                         global_hash=r["global_hash"])
    resumed = {(step, h) for (_, step), hashes in resume_hashes.items() for h in hashes}
    unseen = sorted(resumed - seen - failure_saved)
    # per (world, outer step): every member alive at that step (its sync line) logged one hash
    mismatches = (sum(len(h) > 1 for h in sync_hashes.values())
                  + sum(len(h) > 1 for h in resume_hashes.values()) + diverged)
    starts = defaultdict(int)  # process starts per metrics file (= per worker slot in heal mode)
    for path in sorted(run_dir.glob("metrics-*.jsonl")):
        starts[path.stem] = sum(r.get("kind") == "event" and r.get("event") == "start" for r in read_jsonl(path))
    summaries = final_summaries(run_dir)
    finished = (bool(summaries) and len(summaries) == summaries[0]["num_workers"]
                and all(s["inner_steps"] == run_steps for s in summaries)
                and len({s["global_hash"] for s in summaries}) == 1)
    return {
        "finished": finished,
        "hash_mismatches": mismatches,
        "diverged_events": diverged,
        "resumes_from_unseen_state": len(unseen),
        "resumes_from_failure_state": len((resumed & failure_saved) - seen),
        "nonfinite_steps": nonfinite,
        "outer_steps_checked": len(sync_hashes),
        "members_per_outer_step": {"min": min(map(len, sync_lines.values()), default=0),
                                   "max": max(map(len, sync_lines.values()), default=0)},
        "outer_steps_missing_a_member": sum(len(v) < max(p or 0 for p in v) for v in sync_lines.values()),
        "heals": sum(e["event"] == "heal" for e in epochs.values()),
        "admits": sum(e["event"] == "admit" for e in epochs.values()),
        "epochs": sorted(epochs.values(), key=lambda e: e["time"]),
        "live_joins": sorted(joins, key=lambda j: j["time"]),
        "process_starts": sum(starts.values()),
        "final_eval_loss": summaries[0]["final_eval_loss"] if summaries else None,
        "final_global_hash": summaries[0]["global_hash"] if summaries else None,
        "final_workers": summaries[0]["num_workers"] if summaries else 0,
        "worlds": sorted(worlds.values(), key=lambda w: w["time"]),
    }


def summarize(run_root: Path, runs: dict, cfg, args, schedule: list) -> dict:
    ref = analyze(run_root / "reference", cfg.run.steps) if "reference" in runs else {}
    got = analyze(run_root / "chaos", cfg.run.steps)
    chaos = runs["chaos"]
    scheduled = [f for f in chaos["faults"] if f["kind"] != "rejoin"]
    counts: dict[str, int] = defaultdict(int)
    for f in chaos["faults"]:
        counts[f["kind"]] += 1
    loss, ref_loss = got["final_eval_loss"], ref.get("final_eval_loss")
    # a fault that did its job made the workers restart: a new world started before the next one
    times = [chaos["start_time"] + f["time"] for f in chaos["faults"]] + [math.inf]
    starts = [w["time"] for w in got["worlds"]]
    changes = [e["time"] for e in got["epochs"]]  # heal mode: heal and admit epochs
    for f, begin, end in zip(chaos["faults"], times, times[1:]):
        f["restart_followed"] = any(begin < t <= end for t in starts)
        f["heal_followed"] = any(begin < t <= end for t in changes)
    # heal mode: every worker a fault hit restarts once (a stalled one finds itself excluded);
    # any other start is a survivor that fell back to restarting
    hit = sum(args.workers // args.nodes if f["kind"] == "kill_node" else 1
              for f in scheduled if "skipped" not in f and f["kind"] != "liar")
    return {
        "faults_requested": args.faults,
        "faults_injected": len([f for f in scheduled if "skipped" not in f]),
        "fault_counts": dict(counts),
        "kills_mid_checkpoint_write": sum(bool(f.get("mid_write")) for f in scheduled),
        "faults_followed_by_restart": sum(f["restart_followed"] for f in chaos["faults"]),
        "faults_followed_by_heal": sum(f["heal_followed"] for f in chaos["faults"]),
        "backend": args.backend,
        "heals": got["heals"],
        "admits": got["admits"],
        "live_joins": len(got["live_joins"]),
        "worker_starts": got["process_starts"],
        "worker_starts_beyond_faults": got["process_starts"] - args.workers - hit,
        "survived": got["finished"],
        "agent_exit_codes": chaos["exit_codes"],
        "hash_mismatches": got["hash_mismatches"],
        "resumes_from_unseen_state": got["resumes_from_unseen_state"],
        "resumes_from_failure_state": got["resumes_from_failure_state"],
        "nonfinite_steps": got["nonfinite_steps"],
        "final_eval_loss": loss,
        "reference_eval_loss": ref_loss,
        "loss_ratio": loss / ref_loss if finite(loss) and finite(ref_loss) else None,
        "loss_within_usual_ratio": (finite(loss) and finite(ref_loss)
                                    and 1 / USUAL_LOSS_RATIO <= loss / ref_loss <= USUAL_LOSS_RATIO
                                    if ref else None),
        "usual_loss_ratio": USUAL_LOSS_RATIO,
        "poisoned_rounds": poisoned_rounds(run_root / "chaos"),
        # exact resumes only (no world changed size): the result must be the reference's, bit for bit
        "same_result_as_reference": bool(ref) and got["final_global_hash"] == ref["final_global_hash"],
        "wall_seconds": chaos["wall_seconds"],
        "reference_wall_seconds": runs["reference"]["wall_seconds"] if ref else None,
        "restarts": max(0, len(got["worlds"]) - 1),
        "outer_steps_checked": got["outer_steps_checked"],
        "members_per_outer_step": got["members_per_outer_step"],
        "outer_steps_missing_a_member": got["outer_steps_missing_a_member"],
        "reference_survived": ref.get("finished"),
        "reference_hash_mismatches": ref.get("hash_mismatches"),
        "final_workers": got["final_workers"],
        "workers": args.workers,
        "nodes": args.nodes,
        "seed": args.seed,
        "run_steps": cfg.run.steps,
        "inner_steps_per_round": cfg.outer.inner_steps,
        "comm_timeout": args.timeout,
        "schedule": [list(s) for s in schedule],
        "faults": chaos["faults"],
        "events": chaos["events"],
        "worlds": got["worlds"],
        "epochs": got["epochs"],
        "run_dir": str(run_root),
    }


def loss_points(run_dir: Path, start_time: float) -> dict[str, tuple[list, list, list]]:
    """Per world: (seconds since start, inner step, mean loss over workers) of each outer step."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in records(run_dir):
        if r.get("kind") == "sync" and finite(r.get("loss")):
            groups[(r.get("world"), r["outer_step"])].append(r)
    worlds: dict[str, list] = defaultdict(list)
    for (world, _), g in groups.items():
        worlds[world].append((sum(x["time"] for x in g) / len(g) - start_time, g[0]["step"],
                              sum(x["loss"] for x in g) / len(g)))
    return {w: tuple(map(list, zip(*sorted(points)))) for w, points in worlds.items()}


def plot(run_root: Path, runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"kill_worker": "tab:red", "kill_node": "tab:purple", "kill_in_checkpoint": "tab:orange",
              "stall": "tab:cyan", "rejoin": "tab:green"}
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, color in (("reference", "black"), ("chaos", "tab:blue")):
        if name not in runs:
            continue
        worlds = loss_points(run_root / name, runs[name]["start_time"])
        for i, (t, step, loss) in enumerate(worlds.values()):  # one segment per world
            label = f"{name} ({len(worlds)} world{'s' * (len(worlds) > 1)})" if i == 0 else None
            by_time.plot(t, loss, ".-", ms=3, lw=1, color=color, label=label)
            by_step.plot(step, loss, ".", ms=4 if name == "reference" else 3, color=color, label=label)
    for f in runs["chaos"]["faults"]:
        by_time.axvline(f["time"], color=colors.get(f["kind"], "grey"), lw=0.8, alpha=0.7)
    for kind, color in colors.items():
        by_time.plot([], [], color=color, lw=1, label=kind)
    by_time.set(xlabel="wall seconds since start", ylabel="train loss at outer steps (mean over workers)",
                title="loss over time, faults marked")
    by_step.set(xlabel="inner step", ylabel="train loss", title="loss by step (every world, rewinds included)")
    by_time.legend(fontsize=7, loc="upper right")
    by_step.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
