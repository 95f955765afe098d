"""Overlapped outer steps (`outer.overlap delayed|eager`) against core DiLoCo, long enough to mean
something: same model, data, seed and tokens; ratios to the core run of the same seed.

    flock /work/lead/heavy.lock python tools/bench_overlap.py --seeds 0,1,2 --steps 2000 \\
        --out docs/results/overlap.json --png docs/img/overlap.png

    # any variant: NAME=dilo arguments (on top of the common ones); `core` is the baseline
    python tools/bench_overlap.py --variants core,eager --variant "eager-lr0.4=--outer.overlap eager --outer.lr 0.4"

Every run goes through dilo's CLI (`torchrun --nproc-per-node M -m dilo.train`), one at a
time, and the tool reads its summary-*.json and metrics-0.jsonl. The common arguments are
SMALL below (a shrunk tiny.toml: CPU minutes per run) plus whatever follows `--`.
Reported per variant: every seed's final eval loss, its ratio to the core run of the same
seed, their median, whether every worker ended on the same global hash, bytes, hidden
sync time, and the ratio along the run (`ratio_curve`: each eval point over its base's
eval loss interpolated at the same inner step, mean over seeds; the base is the --pair
base, else core); the PNG shows eval loss and that ratio against inner steps (seed of
--plot-seed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_tuned import mean_ratio_curve
from tools.report import (
    ToolError,
    describe,
    document,
    png_path,
    require_matplotlib,
    run_tool,
    write_json,
)
from tools.runs import check_config, finished, metrics, run_logged, summaries, train_cmd

SMALL = ["--config", "configs/tiny.toml", "--model.d_model", "64", "--model.n_layers", "2",
         "--model.n_heads", "2", "--model.seq_len", "64", "--data.batch_size", "8",
         "--data.eval_batches", "4", "--data.max_bytes", "1000000", "--inner.warmup_steps", "10",
         "--outer.inner_steps", "20", "--run.threads", "1", "--checkpoint.every", "0",
         "--metrics.progress", "off"]

_ALL = "--outer.fragments 2 --outer.delay 2 --comm.codec fp4 --comm.error_feedback true"
VARIANTS = {
    "core": "",
    "delayed": "--outer.overlap delayed",
    "eager": "--outer.overlap eager",
    "all": f"{_ALL} --outer.overlap eager",  # (SMALL has 2 layers: at most 2 fragments)
    "eager-lr0.3": "--outer.overlap eager --outer.lr 0.3",
    "delayed-lr0.2": "--outer.overlap delayed --outer.lr 0.2",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant names to run")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="define (or redefine) a variant: its dilo arguments; repeatable")
    p.add_argument("--pair", action="append", default=[], metavar="VARIANT=BASE",
                   help="also report VARIANT's ratio to BASE of the same seed (e.g. eager against core "
                        "with the same outer optimizer); repeatable")
    p.add_argument("--seeds", default="0", help="comma list of run.seed values")
    p.add_argument("--steps", type=int, default=2000, help="inner steps per worker")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=100, help="inner steps between evaluations")
    p.add_argument("--runs-dir", default="runs/bench_overlap", help="run folders (reused when finished)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--out", default="runs/bench_overlap/overlap.json")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    p.add_argument("--plot-seed", type=int, help="seed whose curves the PNG shows (default: the first)")
    p.add_argument("dilo_args", nargs=argparse.REMAINDER, help="-- then extra dilo arguments for every run")
    args = p.parse_args(argv)
    args.defs = dict(VARIANTS)
    for spec in args.variant:
        name, sep, rest = spec.partition("=")
        if not sep or not name or "/" in name:
            raise ToolError(f"--variant {spec!r}: write NAME=ARGS")
        args.defs[name] = rest
    args.names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in args.names if n not in args.defs]
    if unknown:
        raise ToolError(f"--variants: unknown {unknown}; known: {', '.join(args.defs)} (or define with --variant)")
    if "core" not in args.names:
        raise ToolError("--variants must include core (the baseline of every ratio)")
    args.pairs = {}
    for spec in args.pair:
        name, sep, base = spec.partition("=")
        if not sep or name not in args.names or base not in args.names:
            raise ToolError(f"--pair {spec!r}: write VARIANT=BASE, both in --variants ({args.variants})")
        args.pairs[name] = base
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.extra = [a for a in args.dilo_args if a != "--"]
    return args


def run_args(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    """A variant's dilo arguments come after the common ones and --eval-every's, so it may override them
    (e.g. `--data.eval_every 1` to see every round)."""
    every = max(1, args.eval_every // int(_value(SMALL + args.extra, "--outer.inner_steps")))
    return [*SMALL, *args.extra, "--data.eval_every", str(every), *shlex.split(args.defs[name]),
            "--run.seed", str(seed), "--run.steps", str(args.steps)]


def _value(argv: list[str], key: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(key) + 1]


def execute(args: argparse.Namespace, name: str, seed: int) -> dict:
    dilo_args = run_args(args, name, seed)
    check_config(dilo_args)
    run_dir = Path(args.runs_dir) / f"{name}_seed{seed}"
    if not finished(run_dir, args.workers):
        run_logged(train_cmd([*dilo_args, "--run.dir", str(run_dir)], args.workers), run_dir / "log.txt",
                   args.timeout, f"{name} seed {seed}")
    found = summaries(run_dir)
    curve = [(r["step"], r["eval_loss"]) for r in metrics(run_dir) if r.get("kind") == "eval"]
    s = found[0]
    return {"variant": name, "seed": seed, "args": args.defs[name], "final_eval_loss": s["final_eval_loss"],
            "hashes_agree": len({x["global_hash"] for x in found}) == 1, "outer_steps": s["outer_steps"],
            "tokens_per_worker": s["tokens"], "bytes_sent_per_worker": s["bytes_sent"],
            "peak_sync_bytes": s["peak_sync_bytes"], "sync_seconds_hidden": s["sync_seconds_hidden"],
            "sync_seconds_exposed": s["sync_seconds_exposed"], "wall_seconds": s["wall_seconds"],
            "eval_curve": curve}


def paired_ratios(runs: list[dict], name: str, base: str) -> list[float]:
    """name's final eval loss over base's, per seed both have."""
    by_seed = {r["seed"]: r["final_eval_loss"] for r in runs if r["variant"] == base}
    return [r["final_eval_loss"] / by_seed[r["seed"]] for r in runs if r["variant"] == name and r["seed"] in by_seed]


def aggregate(runs: list[dict], names: list[str], pairs: dict[str, str] | None = None) -> list[dict]:
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        ratios = paired_ratios(runs, name, "core")
        rows.append({"variant": name, "args": mine[0]["args"], "seeds": [r["seed"] for r in mine],
                     "final_eval_loss": describe([r["final_eval_loss"] for r in mine]),
                     "ratio_to_core": describe(ratios), "ratios": ratios,
                     "hashes_agree": all(r["hashes_agree"] for r in mine), "outer_steps": mine[0]["outer_steps"],
                     "bytes_sent_per_worker": mine[0]["bytes_sent_per_worker"],
                     "peak_sync_bytes": mine[0]["peak_sync_bytes"]})
        if name in (pairs or {}):
            rows[-1]["pair"] = {"base": pairs[name], "ratio": describe(paired_ratios(runs, name, pairs[name]))}
        rows[-1]["ratio_curve"] = curve_to_base(runs, name, (pairs or {}).get(name, "core"))
        swings = [got for got in map(swing, mine) if got is not None]
        if swings:  # (only with an evaluation every round or so: --eval-every ≈ outer.inner_steps)
            rows[-1]["swing"] = describe([sw for sw, _ in swings])
            rows[-1]["end_jump"] = describe([jump for _, jump in swings])
    return rows


def swing(run: dict) -> tuple[float, float] | None:
    """How much a run's eval loss swings from round to round, and what its end costs: the standard
    deviation of the evaluations over the run's last quarter (the final one excluded) around their
    centered 7-point mean, and the final eval loss ÷ the last evaluation before the end (the
    flush: an overlapped run ends on the shared θ, not on the live model it evaluated during the
    run). None with fewer than 15 evaluations in that quarter."""
    end = max(step for step, _ in run["eval_curve"]) if run.get("eval_curve") else 0
    late = [loss for step, loss in run.get("eval_curve", []) if 0.75 * end <= step < end]
    if len(late) < 15:
        return None
    residuals = [late[i] - sum(late[i - 3:i + 4]) / 7 for i in range(3, len(late) - 3)]
    mean = sum(residuals) / len(residuals)
    return (sum((r - mean) ** 2 for r in residuals) / len(residuals)) ** 0.5, run["final_eval_loss"] / late[-1]


def curve_to_base(runs: list[dict], name: str, base: str) -> list[list[float]]:
    """[inner step, name's eval loss ÷ base's at that step] along the run, mean over the seeds both have
    (an overlapped run evaluates at other steps than core: the base is interpolated)."""
    bases = {r["seed"]: r for r in runs if r["variant"] == base}
    return mean_ratio_curve([(r, bases[r["seed"]]) for r in runs
                             if r["variant"] == name and r["seed"] in bases and r.get("eval_curve")])


def plot(runs: list[dict], rows: list[dict], seed: int, path: Path) -> None:
    plt = require_matplotlib()
    fig, (ax, rax) = plt.subplots(1, 2, figsize=(12, 4.5))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {row["variant"]: cycle[i % len(cycle)] for i, row in enumerate(rows)}
    for r in runs:
        if r["seed"] == seed and r["eval_curve"]:
            steps, losses = zip(*r["eval_curve"])
            ax.plot(steps, losses, label=r["variant"], lw=1.2, color=color.get(r["variant"]))
    ax.set_xlabel("inner steps per worker")
    ax.set_ylabel("eval loss")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.set_title(f"overlapped outer steps vs core DiLoCo (seed {seed})")
    ax.legend(fontsize=7)
    for row in rows:
        base = row.get("pair", {}).get("base", "core")
        if row["variant"] != base and row["ratio_curve"]:
            steps, ratios = zip(*row["ratio_curve"])
            rax.plot(steps, ratios, marker=".", lw=1.2, label=f"{row['variant']} ÷ {base}", color=color[row["variant"]])
    rax.axhline(1.03, color="grey", ls="--", lw=0.8, label="1.03")
    rax.set_xlabel("inner steps per worker")
    rax.set_ylabel("eval loss ÷ base's at the same step")
    rax.set_title("ratio along the run (mean over seeds)")
    rax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    names = ["core", *[n for n in args.names if n != "core"]]
    settings = {"workers": args.workers, "steps": args.steps, "seeds": args.seeds, "common_args": SMALL + args.extra,
                "variants": {n: args.defs[n] for n in names}, "pairs": args.pairs,
                "commands": {f"{n} seed={s}": " ".join(train_cmd([*run_args(args, n, s), "--run.dir", "DIR"],
                                                                 args.workers)) for s in args.seeds for n in names}}
    runs: list[dict] = []
    for seed in args.seeds:
        for name in names:
            start = time.time()
            runs.append(execute(args, name, seed))
            r = runs[-1]
            base = next(x for x in runs if x["variant"] == "core" and x["seed"] == seed)
            print(f"bench_overlap: {name:24s} seed {seed}  eval {r['final_eval_loss']:.4f}  "
                  f"ratio {r['final_eval_loss'] / base['final_eval_loss']:.4f}  hashes agree {r['hashes_agree']}  "
                  f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
            write_json(args.out, document("bench_overlap", settings, {"variants": aggregate(runs, names, args.pairs), "runs": runs}))
    rows = aggregate(runs, names, args.pairs)
    for row in rows:
        ratio = row["ratio_to_core"]
        pair = (f"  ratio to {row['pair']['base']} median {row['pair']['ratio']['median']:.4f}"
                if "pair" in row and row["pair"]["ratio"]["n"] else "")
        swung = (f"  swing {row['swing']['median']:.4f}  end ÷ last eval {row['end_jump']['median']:.4f}"
                 if "swing" in row else "")
        print(f"{row['variant']:24s} eval {row['final_eval_loss']['median']:.4f}  ratio to core median "
              f"{ratio['median']:.4f} [{ratio['min']:.4f}, {ratio['max']:.4f}]  n={ratio['n']}{pair}{swung}")
    if picture:
        plot(runs, rows, args.plot_seed if args.plot_seed is not None else args.seeds[0], picture)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_overlap"))
