"""One lying worker against each aggregation rule: what the liar does to the final loss.

    flock /work/lead/heavy.lock python tools/bench_robust.py --out docs/results/robust.json \\
        [--workers 4] [--steps 100] [--inner-steps 20] [--aggregates mean] [--attacks all]

For every attack and every aggregate rule, one torchrun run of `--workers` workers on
configs/tiny.toml, in which rank 1 lies at every round (tools/poison.py), and one run of
the same settings without the liar (per codec setting and rule). Attacks (`ATTACKS`):

  x1000      Δ × 1000, int8
  sign       Δ × −10, int8
  noise      Δ + noise of 100 × ‖Δ‖, int8
  inf_fp16   +Inf, fp16
  inf_bf16   +Inf, bf16
  nan_ef     NaN, int8 with comm.error_feedback

Per run: final eval loss ÷ the clean run's (`loss_ratio`), whether the honest workers end
with one global hash, whether θ is finite (read from the final checkpoint), the dropped
contributions and the rounds poisoned. `--aggregates` is a comma list passed as
`--outer.aggregate` (omitted for `mean`, the only rule before issue 13's aggregators), so
a new rule needs no change here. Runs are sequential, one thread per process; the
numbers are one run each on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dilo import checkpoint  # noqa: E402

ATTACKS = {  # name: (tools/poison.py kind, dilo.train options)
    "x1000": ("scaled", ["--comm.codec", "int8"]),
    "sign": ("sign", ["--comm.codec", "int8"]),
    "noise": ("noise", ["--comm.codec", "int8"]),
    "inf_fp16": ("inf", ["--comm.codec", "fp16"]),
    "inf_bf16": ("inf", ["--comm.codec", "bf16"]),
    "nan_ef": ("nan", ["--comm.codec", "int8", "--comm.error_feedback", "true"]),
}
LIAR = 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, name: str, args: argparse.Namespace, train: list[str], poison: str | None) -> dict:
    run_dir = root / name
    entry = ["tools/poison.py", "--poison", poison, "--poison-worker", str(LIAR), "--"] if poison else ["-m", "dilo.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.workers),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *entry,
           "--config", str(REPO / "configs" / "tiny.toml"), "--run.dir", str(run_dir),
           "--run.steps", str(args.steps), "--outer.inner_steps", str(args.inner_steps),
           "--checkpoint.every", str(args.steps // args.inner_steps), "--metrics.progress", "off",
           "--run.threads", "1", *train]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=args.timeout).returncode
    summaries = [json.loads(p.read_text()) for p in sorted(run_dir.glob("summary-*.json"))]
    honest = [s for s in summaries if s["worker"] != LIAR or not poison]
    steps = checkpoint.list_steps(run_dir)
    theta_finite = None
    if steps:
        state = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run_dir, steps[-1]), 0))
        theta_finite = bool(torch.isfinite(state["diloco"]["global_params"]).all())
    loss = honest[0]["final_eval_loss"] if honest else None
    lies = (run_dir / f"poison-{LIAR}.jsonl")
    return {"name": name, "exit_code": rc, "wall_seconds": round(time.time() - start, 1),
            "final_eval_loss": loss if loss is None or math.isfinite(loss) else str(loss),
            "honest_hashes_identical": len({s["global_hash"] for s in honest}) == 1 if honest else None,
            "theta_finite": theta_finite,
            "dropped_contributions": [s.get("dropped_contributions") for s in summaries],
            "poisoned_rounds": len(lies.read_text().splitlines()) if lies.exists() else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "robust.json"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--aggregates", default="mean", help="comma list of outer.aggregate rules")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    p.add_argument("--run-root", default="", help="where the runs go (default: /tmp/bench_robust-<time>)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks or args.workers <= LIAR or args.steps % args.inner_steps:
        p.error(f"--attacks from {', '.join(ATTACKS)}; --workers > {LIAR}; --steps a multiple of --inner-steps")
    root = Path(args.run_root or f"/tmp/bench_robust-{int(time.time())}")
    rows, clean = [], {}
    for aggregate in [a for a in args.aggregates.split(",") if a]:
        rule = [] if aggregate == "mean" else ["--outer.aggregate", aggregate]
        for attack in attacks:
            kind, train = ATTACKS[attack]
            key = (aggregate, tuple(train))
            if key not in clean:
                clean[key] = run(root, f"{aggregate}-clean-{'-'.join(train[1::2])}", args, [*train, *rule], None)
                print(json.dumps(clean[key]), flush=True)
            got = run(root, f"{aggregate}-{attack}", args, [*train, *rule], kind)
            ref = clean[key]["final_eval_loss"]
            loss = got["final_eval_loss"]
            got.update(attack=attack, aggregate=aggregate, poison=kind, train_args=train,
                       clean_eval_loss=ref,
                       loss_ratio=loss / ref if isinstance(loss, float) and isinstance(ref, float) else None)
            print(json.dumps(got), flush=True)
            rows.append(got)
    doc = {"tool": "tools/bench_robust.py", "command": " ".join(["python", "tools/bench_robust.py", *(argv or sys.argv[1:])]),
           "workers": args.workers, "liar_rank": LIAR, "steps": args.steps, "inner_steps": args.inner_steps,
           "config": "configs/tiny.toml", "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared",
           "runs": rows, "clean_runs": list(clean.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
