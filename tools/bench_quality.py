"""Quality at equal tokens: DiLoCo (grid of H and codecs) vs data-parallel vs one worker.

    python tools/bench_quality.py --quick --out runs/bench/quality.json
    python tools/bench_quality.py --config configs/tiny.toml --workers 4 --H 10,50,100 \\
        --codecs fp32,int8,fp4 --seeds 0 --out docs/results/quality.json
    python tools/bench_quality.py ... --data.path my_corpus/ --model.d_model 256   # any dilo key

Every run goes through dilo's CLI (`torchrun --nproc-per-node M -m dilo.train` or
`python -m dilo.train`) with the same config, model, data and seed, and reads the
runs' summary-*.json and metrics-*.jsonl:

- `ddp`: M workers, `run.mode ddp` (gradient all-reduce every step, torch DDP);
- `single`: one worker, `run.mode ddp` (plain AdamW), M x the steps and M x the warmup:
  the same total tokens as the M workers together;
- `diloco H=h codec=c`: M workers, `run.mode diloco`, `outer.inner_steps h`, `comm.codec c`.

Reported per configuration, over seeds: final eval loss (mean, std, min, max), bytes
sent per worker, and the ratios to data-parallel of the same seed (eval loss ratio,
bytes ratio = DDP bytes / DiLoCo bytes). DDP bytes are dilo's ring all-reduce estimate
2(M-1)/M x 4P per step (summary field bytes_are_estimated); DiLoCo bytes are counted.
Eval points: every ~steps/--eval-points inner steps (at outer steps for DiLoCo), which
gives the PNG's eval loss vs tokens; the second panel is final loss vs bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo.codecs import CODEC_NAMES  # noqa: E402
from tools.report import (ToolError, describe, document, png_path, require_matplotlib,  # noqa: E402
                          run_tool, write_json)
from tools.runs import REPO, check_config, finished, metrics, run_logged, summaries, train_cmd  # noqa: E402

QUICK = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2",
         "--model.seq_len", "64", "--data.batch_size", "8", "--data.eval_batches", "4",
         "--data.max_bytes", "1000000", "--inner.warmup_steps", "10"]


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run of the benchmark: name, kind, H, codec, seed and its dilo arguments."""
    steps, m, points = args.steps, args.workers, args.eval_points
    every = max(1, steps // points)
    # DDP's byte estimate is booked every outer.inner_steps steps: use a divisor of steps.
    ddp_h = max(d for d in range(1, every + 1) if steps % d == 0)
    runs = []
    for seed in args.seeds:
        common = [*args.dilo_args, "--run.seed", str(seed), "--metrics.progress", "off",
                  "--checkpoint.every", "0"]
        ddp_eval = str(max(1, round(every / ddp_h)))
        if "ddp" in args.baselines:
            runs.append({"name": f"ddp seed={seed}", "kind": "ddp", "H": None, "codec": "fp32",
                         "seed": seed, "nproc": m,
                         "args": [*common, "--run.mode", "ddp", "--run.steps", str(steps),
                                  "--outer.inner_steps", str(ddp_h), "--data.eval_every", ddp_eval]})
        if "single" in args.baselines:
            runs.append({"name": f"single seed={seed}", "kind": "single", "H": None, "codec": None,
                         "seed": seed, "nproc": 1,
                         "args": [*common, "--run.mode", "ddp", "--run.steps", str(m * steps),
                                  "--inner.warmup_steps", str(m * args.warmup),
                                  "--outer.inner_steps", str(m * ddp_h), "--data.eval_every", ddp_eval]})
        for h in args.H:
            for codec in args.codecs:
                runs.append({"name": f"diloco H={h} {codec} seed={seed}", "kind": "diloco", "H": h,
                             "codec": codec, "seed": seed, "nproc": m,
                             "args": [*common, "--run.mode", "diloco", "--run.steps", str(steps),
                                      "--outer.inner_steps", str(h), "--comm.codec", codec,
                                      "--data.eval_every", str(max(1, round(every / h)))]})
    return runs


def run_dir_name(run: dict) -> str:
    return run["name"].replace(" ", "_").replace("=", "")


def execute(run: dict, runs_dir: Path, tokens_per_step: int, timeout_s: float, reuse: bool) -> dict:
    run_dir = runs_dir / run_dir_name(run)
    if not (reuse and finished(run_dir, run["nproc"])):
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ToolError(f"{run_dir} already holds a run; pass --reuse to use finished runs, "
                            "or choose another --runs-dir")
        cmd = train_cmd([*run["args"], "--run.dir", str(run_dir)], nproc=run["nproc"])
        run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", timeout_s, run["name"])
    found = summaries(run_dir)
    if len(found) != run["nproc"] or len({s["global_hash"] for s in found}) != 1:
        raise ToolError(f"{run['name']}: expected {run['nproc']} summaries with one global hash "
                        f"in {run_dir}, found {len(found)}")
    # Tokens of all workers together at each eval point: every worker ran `step` steps.
    # (The last outer step's eval and the final one coincide: keep one per step.)
    evals = {r["step"]: r["eval_loss"] for r in metrics(run_dir, 0) if r["kind"] == "eval"}
    curve = [[step * tokens_per_step * run["nproc"], loss] for step, loss in sorted(evals.items())]
    s0 = found[0]
    return {**{k: run[k] for k in ("name", "kind", "H", "codec", "seed")}, "run_dir": str(run_dir),
            "workers": run["nproc"], "final_eval_loss": s0["final_eval_loss"],
            "tokens": sum(s["tokens"] for s in found),
            "bytes_sent_per_worker": statistics.fmean(s["bytes_sent"] for s in found),
            "bytes_are_estimated": s0["bytes_are_estimated"], "outer_steps": s0["outer_steps"],
            "wall_seconds": max(s["wall_seconds"] for s in found), "eval_curve": curve}


def aggregate(results: list[dict]) -> list[dict]:
    """One row per configuration: spread over seeds and paired ratios to DDP of the same seed."""
    ddp = {r["seed"]: r for r in results if r["kind"] == "ddp"}
    configs: dict[tuple, list[dict]] = {}
    for r in results:
        configs.setdefault((r["kind"], r["H"], r["codec"]), []).append(r)
    rows = []
    for (kind, h, codec), group in configs.items():
        paired = [(r, ddp[r["seed"]]) for r in group if r["seed"] in ddp]
        row = {"config": group[0]["name"].rsplit(" seed=", 1)[0], "kind": kind, "H": h, "codec": codec,
               "seeds": [r["seed"] for r in group],
               "final_eval_loss": describe([r["final_eval_loss"] for r in group]),
               "bytes_sent_per_worker": describe([r["bytes_sent_per_worker"] for r in group]),
               "tokens": group[0]["tokens"],
               "loss_ratio_to_ddp": describe([r["final_eval_loss"] / d["final_eval_loss"]
                                              for r, d in paired]) if paired else None,
               "ddp_bytes_over_bytes": describe([d["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]
                                                 for r, d in paired if r["bytes_sent_per_worker"]])
               if paired and kind == "diloco" else None}
        rows.append(row)
    return rows


def plot(results: list[dict], rows: list[dict], path: Path) -> None:
    plt = require_matplotlib()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    seed0 = min(r["seed"] for r in results)
    for r in (r for r in results if r["seed"] == seed0):
        style = {"ddp": dict(color="k", lw=2), "single": dict(color="gray", lw=2, ls="--")}.get(r["kind"], {})
        xs, ys = zip(*r["eval_curve"]) if r["eval_curve"] else ((), ())
        a.plot([x / 1e6 for x in xs], ys, marker=".", label=r["name"].rsplit(" seed=", 1)[0], **style)
    a.set(xlabel="tokens, all workers (M)", ylabel="eval loss", title=f"eval loss vs tokens (seed {seed0})")
    a.legend(fontsize=6, ncol=2)
    for row in rows:
        x = row["bytes_sent_per_worker"]["median"]
        y = row["final_eval_loss"]["mean"]
        if not x:
            continue
        err = row["final_eval_loss"]["std"] or 0
        b.errorbar(x, y, yerr=err, fmt="o", color="k" if row["kind"] == "ddp" else None)
        b.annotate(row["config"].replace("diloco ", ""), (x, y), fontsize=6,
                   xytext=(3, 3), textcoords="offset points")
    b.set(xscale="log", xlabel="bytes sent per worker", ylabel="final eval loss (mean over seeds)",
          title="final eval loss vs bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_quality", description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE is passed to dilo.train.")
    p.add_argument("--quick", action="store_true",
                   help="a smaller model, 60 steps, H 10,30, int8, 4 workers (a few minutes)")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"), help="dilo TOML preset")
    p.add_argument("--workers", type=int, default=4, help="M (default 4)")
    p.add_argument("--steps", type=int, help="inner steps per worker (default: the config's run.steps)")
    p.add_argument("--H", help="comma list of outer.inner_steps (default 10,50,100)")
    p.add_argument("--codecs", help=f"comma list of {', '.join(CODEC_NAMES)} (default fp32,int8,fp4)")
    p.add_argument("--seeds", default="0", help="comma list of run.seed values (default 0)")
    p.add_argument("--baselines", default="ddp,single", help="comma list of ddp, single ('' = none)")
    p.add_argument("--eval-points", type=int, default=6, help="evaluations per run (approximately)")
    p.add_argument("--runs-dir", help="where runs are kept (default runs/bench_quality-<time>)")
    p.add_argument("--reuse", action="store_true", help="use finished runs found in --runs-dir")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--out", default="runs/bench/quality.json", help="JSON output")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    args, dilo_args = p.parse_known_args(argv)
    for a in dilo_args:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise ToolError(f"unknown option {a}; dilo keys look like --section.key")
    args.dilo_args = ["--config", args.config, *(QUICK if args.quick else []), *dilo_args]
    cfg = check_config(args.dilo_args)
    args.steps = args.steps or (60 if args.quick else cfg.run.steps)
    args.warmup = cfg.inner.warmup_steps
    args.H = [int(h) for h in (args.H or ("10,30" if args.quick else "10,50,100")).split(",")]
    args.codecs = (args.codecs or ("int8" if args.quick else "fp32,int8,fp4")).split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.baselines = [b for b in args.baselines.split(",") if b]
    args.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    for c in args.codecs:
        if c not in CODEC_NAMES:
            raise ToolError(f"--codecs: unknown codec {c!r}; choose from {', '.join(CODEC_NAMES)}")
    for b in args.baselines:
        if b not in ("ddp", "single"):
            raise ToolError(f"--baselines: unknown baseline {b!r}; choose from ddp, single")
    if args.workers < 2:
        raise ToolError("--workers must be >= 2 (DiLoCo and data-parallel need several workers)")
    if any(h < 1 for h in args.H) or args.steps < 1 or args.eval_points < 1:
        raise ToolError("--H, --steps and --eval-points must be >= 1")
    for h in args.H:
        if h > args.steps:
            raise ToolError(f"--H {h} is more than --steps {args.steps}: no outer step would run")
    args.runs_dir = Path(args.runs_dir or f"runs/bench_quality-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()  # fail now, not after the runs
    runs = plan(args)
    settings = {"config": args.config, "workers": args.workers, "steps": args.steps, "H": args.H,
                "codecs": args.codecs, "seeds": args.seeds, "baselines": args.baselines,
                "dilo_args": args.dilo_args, "runs_dir": str(args.runs_dir),
                "commands": {r["name"]: " ".join(train_cmd([*r["args"], "--run.dir", "DIR"], r["nproc"]))
                             for r in runs}}
    results: list[dict] = []
    for i, run in enumerate(runs, 1):
        start = time.time()
        print(f"bench_quality: [{i}/{len(runs)}] {run['name']}", file=sys.stderr, flush=True)
        results.append(execute(run, args.runs_dir, args.tokens_per_step, args.timeout, args.reuse))
        r = results[-1]
        print(f"bench_quality:   eval loss {r['final_eval_loss']:.4f}, "
              f"{r['bytes_sent_per_worker'] / 1e6:.2f} MB/worker, {time.time() - start:.0f} s",
              file=sys.stderr, flush=True)
        write_json(args.out, document("bench_quality", settings,
                                      {"configs": aggregate(results), "runs": results}))
    rows = aggregate(results)
    for row in rows:
        lr, br = row["loss_ratio_to_ddp"], row["ddp_bytes_over_bytes"]
        print(f"{row['config']:24} eval {row['final_eval_loss']['mean']:.4f} "
              f"± {row['final_eval_loss']['std']:.4f}  "
              f"loss/ddp {lr['median'] if lr else float('nan'):.4f}  "
              f"ddp bytes / bytes {br['median'] if br else float('nan'):.1f}")
    if picture:
        plot(results, rows, picture)
    print(f"bench_quality: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_quality"))
