"""Streaming DiLoCo, overlap and 4-bit Δ against the core int8 run, same config, same tokens.

    nice -n 10 python tools/bench_streaming.py --out runs/bench-streaming/results.json \\
        --workers 4 -- --config configs/tiny.toml --run.steps 200 --checkpoint.every 0

Runs each variant below one after the other as a user would (`torchrun -m dilo.train`,
the arguments after `--` plus the variant's keys, a fresh run.dir each), reads the
workers' summary-*.json and writes one JSON with, per variant: final eval loss and its
ratio to the `core` run, tokens, bytes sent per worker, peak bytes in one sync, sync
seconds, hidden and exposed, and the hidden fraction. Variants run one at a time so they
do not slow each other down; repeat with `--run.seed` for other seeds. Variants already
in `--out` (same arguments) are kept and not run again, so variants can be added later.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "core": [],  # int8, P = 1, τ = 0, overlap none: the classic algorithm
    "fp32": ["--comm.codec", "fp32"],  # the lossless wire: what int8 and fp4 lose
    "streaming": ["--outer.fragments", "4", "--outer.delay", "2"],
    "delayed": ["--outer.overlap", "delayed"],
    "eager": ["--outer.overlap", "eager"],
    "fp4": ["--comm.codec", "fp4"],
    "fp4+ef": ["--comm.codec", "fp4", "--comm.error_feedback", "true"],
    # delayed updates with heavy Nesterov momentum oscillate (docs/streaming.md): without momentum
    "delayed-mom0": ["--outer.overlap", "delayed", "--outer.momentum", "0", "--outer.nesterov", "false"],
    "eager-mom0": ["--outer.overlap", "eager", "--outer.momentum", "0", "--outer.nesterov", "false"],
    "all-mom0": ["--outer.fragments", "4", "--outer.delay", "2", "--outer.overlap", "eager",
                 "--comm.codec", "fp4", "--comm.error_feedback", "true",
                 "--outer.momentum", "0", "--outer.nesterov", "false"],
    "all": ["--outer.fragments", "4", "--outer.delay", "2", "--outer.overlap", "eager",
            "--comm.codec", "fp4", "--comm.error_feedback", "true"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(name: str, args: list[str], workers: int, run_dir: Path, timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dilo.train",
           *args, *VARIANTS[name], "--run.dir", str(run_dir), "--metrics.progress", "off"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise
    if rc != 0:
        raise SystemExit(f"{name}: exit code {rc}; see {run_dir / 'log.txt'}")
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("summary-*.json"))]


def describe(name: str, found: list[dict], core: dict | None) -> dict:
    s = found[0]
    # time over all workers: one that runs ahead waits for the others' exchanges (exposed)
    hidden = sum(x["sync_seconds_hidden"] for x in found)
    exposed = sum(x["sync_seconds_exposed"] for x in found)
    loss = sum(x["final_eval_loss"] for x in found) / len(found)  # identical after the final drain
    row = {
        "variant": name, "args": VARIANTS[name], "workers": len(found),
        "hashes_agree": len({x["global_hash"] for x in found}) == 1,
        "final_eval_loss": loss, "tokens_per_worker": s["tokens"], "outer_steps": s["outer_steps"],
        "bytes_sent_per_worker": s["bytes_sent"], "peak_sync_bytes": s["peak_sync_bytes"],
        "sync_seconds_all_workers": hidden + exposed, "sync_seconds_hidden_all_workers": hidden,
        "sync_seconds_exposed_all_workers": exposed,
        "hidden_fraction": hidden / (hidden + exposed) if hidden + exposed > 0 else 0.0,
        "wall_seconds": max(x["wall_seconds"] for x in found),
    }
    if core is not None:
        row["eval_loss_ratio_to_core"] = loss / core["final_eval_loss"]
        row["bytes_ratio_to_core"] = s["bytes_sent"] / core["bytes_sent_per_worker"]
        row["peak_ratio_to_core"] = s["peak_sync_bytes"] / core["peak_sync_bytes"]
        assert s["tokens"] == core["tokens_per_worker"], "variants must see the same tokens"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-streaming/results.json")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--reread", action="store_true",
                        help="do not train: rebuild --out from the summaries already in its folder")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then dilo.train arguments")
    opts = parser.parse_args()
    train_args = [a for a in opts.train_args if a != "--"] or ["--config", "configs/tiny.toml"]
    names = opts.variants.split(",")
    if any(n not in VARIANTS for n in names):
        raise SystemExit(f"--variants: any of {', '.join(VARIANTS)}")
    out = Path(opts.out)
    # Variants already in --out (same arguments) are kept, not run again: add variants later.
    rows = json.loads(out.read_text())["results"] if out.exists() and not opts.reread else []
    if rows and json.loads(out.read_text())["train_args"] != train_args:
        raise SystemExit(f"{out} holds runs with other arguments; choose another --out")
    core = next((r for r in rows if r["variant"] == "core"), None)
    names = [n for n in names if n not in {r["variant"] for r in rows}]
    if core is None and (not names or names[0] != "core"):
        raise SystemExit("the core variant must run first (it is the baseline of every ratio)")
    for name in names:
        start = time.time()
        if opts.reread:
            found = [json.loads(p.read_text()) for p in sorted((out.parent / name).glob("summary-*.json"))]
        else:
            found = run_variant(name, train_args, opts.workers, out.parent / name, opts.timeout)
        row = describe(name, found, core)
        core = core or row
        rows.append(row)
        print(f"{name:10s} loss {row['final_eval_loss']:.4f} ratio {row.get('eval_loss_ratio_to_core', 1):.4f} "
              f"sent {row['bytes_sent_per_worker']} peak {row['peak_sync_bytes']} "
              f"hidden {row['hidden_fraction']:.2f} ({time.time() - start:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"train_args": train_args, "workers": opts.workers, "results": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
