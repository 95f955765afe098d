"""The low-bit codecs (int2, sparse) against int8 and fp4 at equal steps, one bench_quality run each.

    python tools/bench_lowbit.py --out docs/results/lowbit_quality.json --png docs/img/lowbit_quality.png
    python tools/bench_lowbit.py --quick --out runs/bench/lowbit.json
    python tools/bench_lowbit.py --full --steps 2000 --H 50 --seeds 0,1,2 --variants "int8 mom0 lr1,sparse 0.02 mom0 lr2 b0.95" --data.path corpus/

Every variant is one `tools/bench_quality.py` invocation (its --quick model: 64 wide, 2
layers, sequence 64, batch 8, unless --full: the --config preset's model; M workers,
seed(s), H; any other --section.key VALUE is passed on) with the variant's dilo arguments, so
each row is a real `torchrun -m dilo.train` run; the first variant also runs the
data-parallel baseline. Reported per variant: final eval loss (mean over seeds), its ratio
to the first variant's (`vs_first`, int8 by default), bytes sent per worker (counted by
dilo), and fp4's bytes ÷ these when an fp4 variant ran. Runs are kept in --runs-dir;
--reuse takes finished ones from there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.report import ToolError, document, png_path, require_matplotlib, run_tool, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
M0 = ["--outer.momentum", "0", "--outer.nesterov", "false"]
SPARSE = ["--codecs", "sparse", "--comm.value_bits", "2"]
VARIANTS = {
    "int8": ["--codecs", "int8"],
    "int8 mom0 lr1": ["--codecs", "int8", *M0, "--outer.lr", "1.0"],
    "fp4 ef": ["--codecs", "fp4", "--comm.error_feedback", "true"],
    "int2 mom0 lr1": ["--codecs", "int2", *M0, "--outer.lr", "1.0"],
    "int2 ef": ["--codecs", "int2", "--comm.error_feedback", "true"],
    "int2 ef mom0 lr1": ["--codecs", "int2", "--comm.error_feedback", "true", *M0, "--outer.lr", "1.0"],
    "int2 ef owner mom0 lr1": ["--codecs", "int2", "--comm.error_feedback", "true", "--comm.owner_feedback", "true",
                               *M0, "--outer.lr", "1.0"],
    "sparse 0.02": [*SPARSE, "--comm.density", "0.02"],
    "sparse 0.02 mom0 lr2": [*SPARSE, "--comm.density", "0.02", *M0, "--outer.lr", "2.0"],
    "sparse 0.02 mom0 lr2 b0.95": [*SPARSE, "--comm.density", "0.02", *M0, "--outer.lr", "2.0",
                                   "--comm.ef_decay", "0.95"],
    "sparse 0.02 mom0 lr1 b0.95": [*SPARSE, "--comm.density", "0.02", *M0, "--outer.lr", "1.0",
                                   "--comm.ef_decay", "0.95"],
    "sparse 0.02 mom0.5 lr1 b0.95": [*SPARSE, "--comm.density", "0.02", "--outer.momentum", "0.5", "--outer.lr",
                                     "1.0", "--comm.ef_decay", "0.95"],
    "sparse 0.02 two-phase owner mom0 lr2 b0.95": [*SPARSE, "--comm.density", "0.02", *M0, "--outer.lr", "2.0",
                                                   "--comm.ef_decay", "0.95", "--comm.sparse_exchange", "two_phase",
                                                   "--comm.owner_feedback", "true"],
    "sparse 0.05 mom0 lr2 b0.95": [*SPARSE, "--comm.density", "0.05", *M0, "--outer.lr", "2.0",
                                   "--comm.ef_decay", "0.95"],
    "sparse 0.01 mom0 lr2 b0.95": [*SPARSE, "--comm.density", "0.01", *M0, "--outer.lr", "2.0",
                                   "--comm.ef_decay", "0.95"],
}


def run_variant(name: str, first: bool, args: argparse.Namespace) -> dict:
    slug = name.replace(" ", "_")
    out = args.runs_dir / f"{slug}.json"
    if not (args.reuse and out.exists()):
        cmd = [sys.executable, str(REPO / "tools" / "bench_quality.py"), *([] if args.full else ["--quick"]),
               "--config", args.config, "--steps", str(args.steps),
               "--H", str(args.H), "--workers", str(args.workers), "--seeds", args.seeds, "--png", "",
               "--baselines", "ddp" if first else "", "--runs-dir", str(args.runs_dir / slug),
               "--out", str(out), *args.dilo_args, *VARIANTS[name]]
        print(f"bench_lowbit: {name}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        if res.returncode != 0:
            raise ToolError(f"variant {name!r} failed:\n{res.stderr[-2000:]}")
    doc = json.loads(out.read_text())["results"]["configs"]
    row = next(c for c in doc if c["kind"] == "diloco")
    ddp = next((c for c in doc if c["kind"] == "ddp"), None)
    return {"variant": name, "args": VARIANTS[name], "final_eval_loss": row["final_eval_loss"],
            "bytes_sent_per_worker": row["bytes_sent_per_worker"]["mean"],
            "ddp_final_eval_loss": ddp["final_eval_loss"]["mean"] if ddp else None}


def plot(rows: list[dict], path: Path) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        ax.scatter(r["bytes_sent_per_worker"], r["final_eval_loss"]["mean"])
        ax.annotate(r["variant"], (r["bytes_sent_per_worker"], r["final_eval_loss"]["mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (whole run)")
    ax.set_ylabel("final eval loss")
    ax.set_title("low-bit codecs vs int8 (4 workers, equal steps)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_lowbit", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--full", action="store_true", help="the --config preset's model, not bench_quality's --quick one")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"), help="dilo TOML preset")
    p.add_argument("--steps", type=int, default=600, help="inner steps per worker")
    p.add_argument("--H", type=int, default=20, help="outer.inner_steps")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seeds", default="0", help="comma list of run.seed values")
    p.add_argument("--quick", action="store_true", help="int8, int2 ef, sparse 0.02 mom0 lr2 b0.95; 60 steps, H 10")
    p.add_argument("--runs-dir", help="where the runs are kept (default runs/bench_lowbit-<time>)")
    p.add_argument("--reuse", action="store_true", help="use finished variants found in --runs-dir")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    p.add_argument("--out", default="runs/bench/lowbit.json")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    args, args.dilo_args = p.parse_known_args(argv)
    for a in args.dilo_args:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise ToolError(f"unknown option {a}; dilo keys look like --section.key")
    if args.quick:
        args.variants, args.steps, args.H = "int8,int2 ef,sparse 0.02 mom0 lr2 b0.95", 60, 10
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise ToolError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    args.runs_dir = Path(args.runs_dir or f"runs/bench_lowbit-{time.strftime('%Y%m%d-%H%M%S')}")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    rows = [run_variant(name, i == 0, args) for i, name in enumerate(args.variants)]
    first = rows[0]["final_eval_loss"]["mean"]
    fp4 = next((r["bytes_sent_per_worker"] for r in rows if r["variant"].startswith("fp4")), None)
    for r in rows:
        r["vs_first"] = r["final_eval_loss"]["mean"] / first
        r["fp4_bytes_over_bytes"] = fp4 / r["bytes_sent_per_worker"] if fp4 else None
        print(f"{r['variant']:28} eval {r['final_eval_loss']['mean']:.4f}  vs {rows[0]['variant']} "
              f"{r['vs_first']:.3f}  {r['bytes_sent_per_worker'] / 1e6:8.3f} MB/worker"
              + (f"  fp4/this {r['fp4_bytes_over_bytes']:.1f}" if fp4 else ""))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "png")}
    write_json(args.out, document("bench_lowbit", settings, {"rows": rows}))
    if picture:
        plot(rows, picture)
    print(f"bench_lowbit: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_lowbit"))
