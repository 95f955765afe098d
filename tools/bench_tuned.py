"""Quality at equal tokens, each method at its best setting: a tuned, long-horizon sweep.

    python tools/bench_tuned.py --config configs/tiny.toml --workers 4 --steps 2000 --H 50 \\
        --outer-lrs 0.4,0.7,1.0 --ddp-lrs 1e-3,2e-3,4e-3 --seeds 0 --confirm-seeds 1,2 \\
        --variant "eager=--outer.inner_steps 20 --outer.overlap eager" \\
        --parallel 6 --out docs/results/quality_tuned.json

The sibling of tools/bench_quality.py (which runs a fixed grid): the runs are the same dilo
CLI runs (`torchrun -m dilo.train`, read back from their summaries), in three phases.

1. **Sweep** on `--seeds`: data-parallel (`run.mode ddp`, M workers, global batch M x the
   per-worker batch) at every `--ddp-lrs` inner lr, and DiLoCo at every H x codec x
   `--outer-lrs` outer lr.
2. **Confirm** on `--confirm-seeds`: for data-parallel and for each DiLoCo (H, codec), the
   setting with the lowest mean sweep loss, again.
3. **Variants** on all seeds: `--variant [KIND:]NAME=ARGS`, a run with extra dilo arguments
   (another data layout, an overlap mode, another codec) and no sweep: DiLoCo (default), `ddp`,
   or `mN`: DiLoCo with N workers and M/N x the batch each (m1: one worker, the same tokens),
   scored on the same eval windows (N/M x data.eval_batches).

Each method at its own schedule: a variant's ARGS come after the common ones, so they override
them for that variant alone; e.g. DiLoCo without the inner lr decay against data-parallel with it:
`--variant "H50 no decay=--inner.min_lr_ratio 1.0"` (`ddp:NAME=ARGS` for data-parallel's own).
`--sweep-methods ddp` sweeps data-parallel only, so DiLoCo runs just as its variants; `none` runs
the variants alone (e.g. more seeds of a best-vs-best pair, paired with `--baseline`).

Reported per configuration: final eval loss over seeds (mean, std, min, max), bytes per
worker, and the loss and bytes ratios to the best data-parallel setting, paired by seed.
`--parallel N` runs N runs at once (on an accelerator several small runs share it well;
on a CPU it only makes sense with cores to spare). Runs already finished in `--runs-dir`
are reused with `--reuse`, so a sweep cut short by a time limit continues where it was.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import bench_quality
from tools.report import ToolError, describe, document, png_path, require_matplotlib, run_tool, write_json
from tools.runs import check_config, finished, train_cmd


def floats(text: str | None) -> list[float | None]:
    return [float(v) for v in text.split(",")] if text else [None]


def same_tokens_and_eval_set(dilo_args: list[str], m: int, n: int) -> tuple[int, int]:
    """data.batch_size and data.eval_batches for N workers that read what M workers read.

    dilo's eval set is data.eval_batches x data.batch_size windows evenly spaced over the
    validation stream, so M/N x the batch needs N/M x the eval batches to be scored on the
    same windows (with the batch alone an m1 run is scored on 4x the windows: other numbers).
    """
    data = check_config(dilo_args).data
    evals, rest = divmod(data.eval_batches * n, m)
    if rest or not evals:
        raise ToolError(f"an m{n} variant scores on data.eval_batches x {n}/{m} batches of {m // n}x the "
                        f"batch, which must be a whole number: set --data.eval_batches to a multiple of "
                        f"{m // math.gcd(m, n)} (now {data.eval_batches})")
    return data.batch_size * m // n, evals


def run_spec(args, kind: str, seed: int, extra: list[str], **fields) -> dict:
    """One run: its name (config + seed), fields for the report, and its dilo arguments."""
    steps, m = args.steps, args.workers
    every = max(1, steps // args.eval_points)
    common = [*args.dilo_args, "--run.seed", str(seed), "--metrics.progress", "off", "--checkpoint.every", "0"]
    if kind.startswith("m"):  # DiLoCo with N workers, M/N x the batch each: the same tokens per step
        n = int(kind[1:])
        batch, evals = same_tokens_and_eval_set(args.dilo_args, m, n)
        spec = run_spec(args, "diloco", seed, [*extra, "--data.batch_size", str(batch),
                                               "--data.eval_batches", str(evals)], **fields)
        return {**spec, "kind": kind, "nproc": n}
    if kind == "ddp":
        lr = fields["lr"]
        ddp_h = max(d for d in range(1, every + 1) if steps % d == 0)  # DDP bytes are booked every H
        name = fields.get("variant") or ("ddp" + (f" lr={lr:g}" if lr is not None else ""))
        dilo = [*common, "--run.mode", "ddp", "--run.steps", str(steps), "--outer.inner_steps", str(ddp_h),
                "--data.eval_every", str(max(1, round(every / ddp_h)))]
        dilo += ["--inner.lr", repr(lr)] if lr is not None else []
        fields = {"H": None, "codec": "fp32", "outer_lr": None, "variant": None, **fields}
    else:
        h, codec, olr, variant = fields["H"], fields["codec"], fields["outer_lr"], fields.get("variant")
        if extra:  # a variant may set its own H or codec: report what dilo will run
            cfg = check_config([*args.dilo_args, "--outer.inner_steps", str(h), "--comm.codec", codec, *extra])
            h, codec = cfg.outer.inner_steps, cfg.comm.codec
            fields = {**fields, "H": h, "codec": codec}
        name = variant or (f"diloco H={h} {codec}" + (f" olr={olr:g}" if olr is not None else ""))
        dilo = [*common, "--run.mode", "diloco", "--run.steps", str(steps), "--outer.inner_steps", str(h),
                "--comm.codec", codec, "--data.eval_every", str(max(1, round(every / h)))]
        dilo += ["--outer.lr", repr(olr)] if olr is not None else []
        fields = {"lr": None, "variant": None, **fields}
    return {"name": f"{name} seed={seed}", "config": name, "kind": kind, "seed": seed, "nproc": m,
            "args": [*dilo, *extra], **fields}


def sweep(args, seeds: list[int]) -> list[dict]:
    runs = [run_spec(args, "ddp", s, [], lr=lr, phase="sweep")
            for s in seeds for lr in args.ddp_lrs] if "ddp" in args.sweep_methods else []
    runs += [run_spec(args, "diloco", s, [], H=h, codec=c, outer_lr=olr, phase="sweep")
             for s in seeds for h in args.H for c in args.codecs for olr in args.outer_lrs
             if "diloco" in args.sweep_methods]
    return runs


def best_settings(results: list[dict]) -> dict[tuple, dict]:
    """For data-parallel and each DiLoCo (H, codec): the sweep setting of the lowest mean loss
    (over the sweep seeds only: a setting confirmed on more seeds is not judged on other data)."""
    by_config: dict[str, list[dict]] = {}
    for r in results:
        if r.get("phase") == "sweep":
            by_config.setdefault(r["config"], []).append(r)
    best: dict[tuple, tuple[float, dict]] = {}
    for group in by_config.values():
        r = group[0]
        family = ("ddp",) if r["kind"] == "ddp" else (r["kind"], r["H"], r["codec"])
        loss = statistics.fmean(g["final_eval_loss"] for g in group)
        if family not in best or loss < best[family][0]:
            best[family] = (loss, r)
    return {family: r for family, (_, r) in best.items()}


def confirm(args, best: dict[tuple, dict]) -> list[dict]:
    runs = []
    for family, r in best.items():
        for s in args.confirm_seeds:
            if family[0] == "ddp":
                runs.append(run_spec(args, "ddp", s, [], lr=r["lr"], phase="confirm"))
            else:
                runs.append(run_spec(args, "diloco", s, [], H=r["H"], codec=r["codec"], outer_lr=r["outer_lr"],
                                     phase="confirm"))
    return runs


def variants(args) -> list[dict]:
    h, codec = args.H[0], args.codecs[0]
    runs = []
    for kind, name, extra in args.variants:
        for s in args.variant_seeds:
            if kind == "ddp":
                runs.append(run_spec(args, "ddp", s, extra, lr=args.variant_lr, variant=name, phase="variant"))
            else:
                runs.append(run_spec(args, kind, s, extra, H=h, codec=codec, outer_lr=args.variant_outer_lr,
                                     variant=name, phase="variant"))
    return runs


def execute_all(args, runs: list[dict], only_finished: bool = False) -> list[dict]:
    """Run them (args.parallel at once); a run that fails is reported and left out.
    With only_finished (or --report-only) nothing runs: the finished ones are read back."""
    def one(run: dict) -> dict | None:
        start = time.time()
        if (only_finished or args.report_only) and not finished(args.runs_dir / bench_quality.run_dir_name(run),
                                                                  run["nproc"]):
            if only_finished:
                return None
            print(f"bench_tuned: {run['name']}: not run (--report-only)", file=sys.stderr, flush=True)
            return None
        try:
            per_step = args.tokens_per_step * args.workers // run["nproc"]  # mN runs: M/N x the batch
            r = bench_quality.execute(run, args.runs_dir, per_step, args.timeout, True)
        except ToolError as e:
            print(f"bench_tuned: {run['name']} FAILED: {str(e)[:2000]}", file=sys.stderr, flush=True)
            return None
        print(f"bench_tuned: {run['name']}: eval loss {r['final_eval_loss']:.4f}, "
              f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
        keep = ("config", "lr", "outer_lr", "variant", "phase")
        return {**r, **{k: run.get(k) for k in keep}, "args": run["args"]}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        return [r for r in pool.map(one, runs) if r is not None]


def ratio_curve(run: dict, ddp: dict) -> list[list[float]]:
    """[tokens, run's eval loss ÷ data-parallel's] at each of the run's eval points, data-parallel's
    curve interpolated linearly in tokens (the two may evaluate at other steps); points outside
    data-parallel's curve are left out."""
    pts = sorted(ddp.get("eval_curve") or [])
    exact = dict(pts)
    out = []
    for x, y in run.get("eval_curve") or []:
        if x in exact:
            out.append([x, y / exact[x]])
            continue
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if x0 < x < x1:
                out.append([x, y / (y0 + (y1 - y0) * (x - x0) / (x1 - x0))])
                break
    return out


def mean_ratio_curve(paired: list[tuple[dict, dict]]) -> list[list[float]]:
    """The seed-paired ratio curves averaged point by point (points every seed has)."""
    curves = [{x: r for x, r in ratio_curve(run, ddp)} for run, ddp in paired]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [[x, statistics.fmean(c[x] for c in curves)] for x in common]


def aggregate(results: list[dict], baseline: str | None = None) -> dict:
    """Rows per configuration, each paired by seed with the best data-parallel sweep setting,
    or with the configuration named `baseline` (e.g. a ddp variant at its own schedule)."""
    best = best_settings(results)
    ddp_best = best.get(("ddp",))
    base = baseline or (ddp_best and ddp_best["config"])
    ddp_by_seed = {r["seed"]: r for r in results if base and r["config"] == base}
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    rows = []
    for config, group in by_config.items():
        r0 = group[0]
        paired = [(r, ddp_by_seed[r["seed"]]) for r in group if r["seed"] in ddp_by_seed]
        family = ("ddp",) if r0["kind"] == "ddp" else (r0["kind"], r0["H"], r0["codec"])
        rows.append({
            "config": config, "kind": r0["kind"], "H": r0["H"], "codec": r0["codec"], "lr": r0["lr"],
            "outer_lr": r0["outer_lr"], "variant": r0["variant"], "seeds": sorted(r["seed"] for r in group),
            "best_of_family": not r0["variant"] and best.get(family, {}).get("config") == config,
            "final_eval_loss": describe([r["final_eval_loss"] for r in group]),
            "bytes_sent_per_worker": describe([r["bytes_sent_per_worker"] for r in group]),
            "tokens": r0["tokens"], "outer_steps": r0["outer_steps"],
            "loss_ratio_to_best_ddp": describe([r["final_eval_loss"] / d["final_eval_loss"] for r, d in paired])
            if paired else None,
            "loss_ratio_curve": mean_ratio_curve(paired),
            "ddp_bytes_over_bytes": describe([d["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]
                                              for r, d in paired if r["bytes_sent_per_worker"]])
            if paired and r0["kind"] == "diloco" else None})
    return {"best_ddp": ddp_best and ddp_best["config"], "baseline": base, "configs": rows}


def plot(results: list[dict], summary: dict, path: Path) -> None:
    plt = require_matplotlib()
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(18, 4.5))
    seed0 = min(r["seed"] for r in results)
    best = {row["config"] for row in summary["configs"] if row["best_of_family"] or row["variant"]}
    for r in results:
        if r["seed"] != seed0 or r["config"] not in best or not r["eval_curve"]:
            continue
        xs, ys = zip(*r["eval_curve"])
        a.plot([x / 1e6 for x in xs], ys, marker=".", label=r["config"],
               **({"color": "k", "lw": 2} if r["kind"] == "ddp" else {}))
    a.set(xlabel="tokens, all workers (M)", ylabel="eval loss", title=f"best settings, seed {seed0}")
    a.legend(fontsize=6)
    for row in summary["configs"]:
        if row["config"] in best and row["kind"] != "ddp" and row["loss_ratio_curve"]:
            xs, ys = zip(*row["loss_ratio_curve"])
            c.plot([x / 1e6 for x in xs], ys, marker=".", label=f"{row['config']} (n={len(row['seeds'])})")
    c.axhline(1.02, color="r", ls="--", lw=1)
    c.set(xlabel="tokens, all workers (M)", ylabel=f"eval loss ÷ {summary['baseline']}",
          title="the gap along the run (mean over paired seeds)")
    c.legend(fontsize=6)
    rows = [row for row in summary["configs"] if row["loss_ratio_to_best_ddp"]]
    labels = [f"{row['config']} (n={len(row['seeds'])})" for row in rows]
    means = [row["loss_ratio_to_best_ddp"]["mean"] for row in rows]
    errs = [row["loss_ratio_to_best_ddp"]["std"] or 0 for row in rows]
    b.barh(range(len(rows)), [m - 1 for m in means], xerr=errs, left=1,
           color=["k" if row["kind"] == "ddp" else "tab:blue" for row in rows])
    b.axvline(1.02, color="r", ls="--", lw=1)
    b.set_yticks(range(len(rows)), labels, fontsize=6)
    b.set(xlabel=f"eval loss ÷ {summary['baseline']} (same seed)", title="every configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_tuned", description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE is passed to dilo.train.")
    p.add_argument("--config", default=str(bench_quality.REPO / "configs" / "tiny.toml"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, help="inner steps per worker (default: the config's run.steps)")
    p.add_argument("--H", default="50", help="comma list of outer.inner_steps (default 50)")
    p.add_argument("--codecs", default="int8", help="comma list of codecs (default int8)")
    p.add_argument("--outer-lrs", help="comma list of outer.lr for DiLoCo (default: the config's)")
    p.add_argument("--ddp-lrs", help="comma list of inner.lr for data-parallel (default: the config's)")
    p.add_argument("--seeds", default="0", help="sweep seeds (default 0)")
    p.add_argument("--confirm-seeds", default="", help="seeds for the best settings only")
    p.add_argument("--variant", action="append", default=[], metavar="[KIND:]NAME=ARGS",
                   help="a run with extra dilo args on every seed; KIND diloco (default: at the first H "
                        "and codec), ddp, or mN (DiLoCo with N workers, M/N x the batch each, e.g. m1)")
    p.add_argument("--sweep-methods", default="ddp,diloco",
                   help="comma list: which methods the sweep (and confirm) phases run (default ddp,diloco); "
                        "'ddp' alone gives DiLoCo only its --variant runs, e.g. each at its own inner schedule "
                        "(--inner.min_lr_ratio ...) against data-parallel at its tuned one; 'none': only the "
                        "--variant runs (name the data-parallel one with --baseline), e.g. more seeds of a "
                        "best-vs-best pair")
    p.add_argument("--baseline", metavar="CONFIG",
                   help="the configuration every ratio is to, paired by seed (default: the best data-parallel "
                        "sweep setting); e.g. a ddp variant's NAME, data-parallel at its own schedule")
    p.add_argument("--variant-outer-lr", type=float, help="outer.lr for variants (default: the config's)")
    p.add_argument("--variant-lr", type=float, help="inner.lr for ddp variants (default: the config's)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the finished runs found in --runs-dir (the others are listed)")
    p.add_argument("--variant-seeds", help="seeds for variants (default: --seeds and --confirm-seeds)")
    p.add_argument("--eval-points", type=int, default=8)
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--runs-dir", help="where runs are kept (default runs/bench_tuned-<time>)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    p.add_argument("--out", default="runs/bench/quality_tuned.json")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    args, dilo_args = p.parse_known_args(argv)
    for a in dilo_args:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise ToolError(f"unknown option {a}; dilo keys look like --section.key")
    args.dilo_args = ["--config", args.config, *dilo_args]
    cfg = check_config(args.dilo_args)
    args.steps = args.steps or cfg.run.steps
    args.sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    if args.sweep_methods == ["none"]:
        args.sweep_methods = []
    elif not args.sweep_methods or set(args.sweep_methods) - {"ddp", "diloco"}:
        raise ToolError(f"--sweep-methods {','.join(args.sweep_methods)!r}: write a comma list of ddp and "
                        "diloco, or none (variants only)")
    args.H = [int(h) for h in args.H.split(",")]
    args.codecs = args.codecs.split(",")
    args.outer_lrs, args.ddp_lrs = floats(args.outer_lrs), floats(args.ddp_lrs)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.confirm_seeds = [int(s) for s in args.confirm_seeds.split(",") if s]
    args.variant_seeds = ([int(s) for s in args.variant_seeds.split(",")] if args.variant_seeds
                          else [*args.seeds, *args.confirm_seeds])
    args.variants = []
    for v in args.variant:
        name, sep, extra = v.partition("=")
        kind, colon, bare = name.partition(":")
        kind, name = (kind, bare) if colon else ("diloco", name)
        workers_ok = kind[:1] == "m" and kind[1:].isdigit() and 0 < int(kind[1:]) and args.workers % int(kind[1:]) == 0
        if not sep or not name or not (kind in ("diloco", "ddp") or workers_ok):
            raise ToolError(f"--variant {v!r}: write [KIND:]NAME=ARGS with KIND diloco, ddp or mN (N dividing "
                            "--workers), e.g. 'eager=--outer.overlap eager' or 'm1:one worker='")
        args.variants.append((kind, name, extra.split()))
        if kind[:1] == "m":
            same_tokens_and_eval_set([*args.dilo_args, *extra.split()], args.workers, int(kind[1:]))
        check_config([*args.dilo_args, *extra.split()])  # a bad variant fails now, not after the sweep
    known = [name for _, name, _ in args.variants] + [f"ddp lr={lr:g}" if lr is not None else "ddp"
                                                      for lr in args.ddp_lrs]
    if not args.sweep_methods and not args.variants:
        raise ToolError("--sweep-methods none runs only the --variant runs: give at least one --variant")
    if args.baseline is not None and args.baseline not in known:
        raise ToolError(f"--baseline {args.baseline!r}: name a data-parallel sweep setting or a variant "
                        f"({', '.join(known)})")
    if args.workers < 2 or args.parallel < 1 or args.eval_points < 1:
        raise ToolError("--workers must be >= 2, --parallel and --eval-points >= 1")
    if any(h < 1 or h > args.steps for h in args.H):
        raise ToolError(f"--H values must be in 1..--steps ({args.steps})")
    args.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    args.runs_dir = Path(args.runs_dir or f"runs/bench_tuned-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    settings = {k: getattr(args, k) for k in ("config", "workers", "steps", "H", "codecs", "outer_lrs",
                                               "ddp_lrs", "seeds", "confirm_seeds", "sweep_methods", "variants",
                                               "variant_outer_lr", "variant_seeds", "dilo_args", "parallel")}
    settings["runs_dir"] = str(args.runs_dir)
    settings["launch"] = " ".join(train_cmd(["ARGS"], args.workers))
    results: list[dict] = []

    def save() -> None:
        write_json(args.out, document("bench_tuned", settings, {**aggregate(results, args.baseline), "runs": results}))

    # Variants need no sweep: they run alongside it, so a time limit cuts the confirmations last.
    # Sweep runs finished earlier (a cut-short sweep, continued) already name the best settings:
    # their confirmations start with the sweep, not after it.
    known = best_settings(execute_all(args, sweep(args, args.seeds), only_finished=True))
    results += execute_all(args, [*sweep(args, args.seeds), *variants(args), *confirm(args, known)])
    save()
    done = {r["name"] for r in results}
    results += execute_all(args, [r for r in confirm(args, best_settings(results)) if r["name"] not in done])
    save()
    summary = aggregate(results, args.baseline)
    for row in summary["configs"]:
        ratio = row["loss_ratio_to_best_ddp"]
        print(f"{row['config']:34} n={len(row['seeds'])} eval {row['final_eval_loss']['mean']:.4f} "
              f"± {row['final_eval_loss']['std']:.4f}  ÷ {'baseline' if args.baseline else 'best ddp'} "
              f"{ratio['mean'] if ratio else float('nan'):.4f}{'  best' if row['best_of_family'] else ''}")
    if picture and results:
        plot(results, summary, picture)
    print(f"bench_tuned: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_tuned"))
