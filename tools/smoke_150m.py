"""A smoke run of configs/150m.toml on CPU: 2 workers under torchrun, a tiny batch and sequence,
2 outer steps of H = 2, once per `outer.digest` asked for; per outer step the exchange, the
outer SGD and the hash + confirm seconds, and the peak RSS of one worker process.

    flock /work/lead/heavy.lock python tools/smoke_150m.py --digests step,background \\
        --out docs/results/smoke_150m.json

Each run needs ≈ 6.5 GB per worker (model, gradients, AdamW's moments, θ, momentum, Δ and the
exchange buffers at 151M parameters): run it alone. Peak RSS is /usr/bin/time's maximum
resident set size over the launcher's children (one worker process). The first outer step
also pays the momentum's creation and first-touch page faults, and its exchange waits for
the other worker's first inner steps: read the second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.runs import REPO, metrics, run_logged, summaries, train_cmd  # noqa: E402

ARGS = ["--config", "configs/150m.toml", "--run.device", "cpu", "--model.seq_len", "32", "--data.batch_size", "1",
        "--data.max_bytes", "300000", "--data.eval_batches", "1", "--data.eval_every", "1", "--run.steps", "4",
        "--outer.inner_steps", "2", "--inner.warmup_steps", "1", "--checkpoint.every", "0",
        "--metrics.log_every", "1", "--run.threads", "1", "--metrics.progress", "off"]
KEEP = ("outer_step", "seconds", "apply_seconds", "digest_seconds", "hash_step", "global_hash", "bytes_sent",
        "codec_error")


def run(digest: str, workdir: Path) -> dict:
    """One torchrun of 2 workers under /usr/bin/time -v (its report lands in the log); ended,
    with every process it started, on a failure or after 30 minutes (tools/runs.py)."""
    run_dir, log = workdir / digest, workdir / f"{digest}.log"
    start = time.perf_counter()
    run_logged(["/usr/bin/time", "-v", *train_cmd([*ARGS, "--outer.digest", digest, "--run.dir", str(run_dir)],
                                                  nproc=2)], log, 1800, f"the {digest} run")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace"))
    summary = summaries(run_dir)[0]
    syncs = [r for r in metrics(run_dir) if r["kind"] == "sync"]
    return {"digest": digest, "wall_s": time.perf_counter() - start,
            "peak_rss_bytes_one_worker": int(rss.group(1)) * 1024 if rss else None,
            "synced_params": summary["synced_params"], "global_hash": summary["global_hash"],
            "final_eval_loss": summary["final_eval_loss"],
            "outer_steps": [{k: r.get(k) for k in KEEP} for r in syncs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digests", type=lambda s: s.split(","), default=["step", "background"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="smoke_150m.") as tmp:
        runs = [run(d, Path(tmp)) for d in args.digests]
    doc = {"command": "python tools/smoke_150m.py --digests " + ",".join(args.digests),
           "torchrun_args": ARGS, "load_average": os.getloadavg(), "runs": runs}
    for r in runs:
        second = r["outer_steps"][-1]
        print(f"{r['digest']}: outer step {second['outer_step']}: exchange {second['seconds']:.2f} s, "
              f"outer SGD {second['apply_seconds']:.2f} s, hash + confirm {second['digest_seconds']:.2f} s; "
              f"peak RSS {r['peak_rss_bytes_one_worker'] / 2**30:.2f} GiB; final hash {r['global_hash'][:12]}")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
