"""dilo's training loop vs a bare PyTorch loop: same model, data, optimizer, no sync.

    python tools/bench_overhead.py --quick --out runs/bench/overhead.json
    python tools/bench_overhead.py --config configs/tiny.toml --steps 40 --repeats 7

One process, one worker. Each repeat times both, in alternating order (ABBA...), so
machine noise hits both alike:

- dilo: `dilo.train.Trainer(cfg).run()` with `run.mode diloco` and H = steps: the whole
  product loop (LR schedule, DiLoCo bookkeeping, metrics lines, progress, the final
  evaluation and summary) with its one outer step at the end subtracted (the summary's
  `sync_seconds`). Construction (data loading, model init) is not timed;
- bare: `torch.manual_seed`, the same GPT, `torch.optim.AdamW` with the same groups and
  hyper-parameters, the same batches and grad clipping, a warmup + cosine LR written
  here independently, then the same evaluation; a plain `for` loop.

Two clocks: CPU time of this process (`time.process_time`, the work done; with one
torch thread it is barely touched by other processes on a shared machine) and wall
time. The ratio dilo / bare per repeat, median and spread over repeats, is the overhead
(`ratio` = CPU, `wall_ratio` = wall). Both loops must do the same arithmetic: their last
training losses are compared (`same_loss`), so a ratio is never reported for two
different computations.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools.report import ToolError, describe, document, run_tool, write_json  # noqa: E402
from tools.runs import REPO, check_config, metrics  # noqa: E402

QUICK = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2",
         "--model.seq_len", "64", "--data.batch_size", "8", "--data.max_bytes", "1000000"]


def cosine_lr(step: int, peak: float, warmup: int, total: int, floor_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from peak to floor_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * floor_ratio + peak * (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def bare_loop(cfg, tokens, eval_set) -> tuple[float, float, float]:
    """The same training written as a plain PyTorch loop; (wall s, CPU s, last loss)."""
    from dilo.data import ShardedBatches
    from dilo.model import GPT, param_groups

    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(param_groups(model, cfg.inner.weight_decay), lr=cfg.inner.lr,
                            betas=(cfg.inner.beta1, cfg.inner.beta2), fused=False, foreach=False)
    batches = ShardedBatches(tokens, 0, 1, cfg.data.batch_size, cfg.model.seq_len,
                             layout=cfg.data.layout, seed=cfg.run.seed)
    i = cfg.inner
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(cfg.run.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, i.lr, i.warmup_steps, cfg.run.steps, i.min_lr_ratio)
        x, y = batches.next_batch()
        loss = model(x, y)
        loss.backward()
        if i.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), i.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = loss.item()
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model(x, y).item() for x, y in eval_set) / len(eval_set)
    model.train()
    assert math.isfinite(eval_loss)
    return time.perf_counter() - start, time.process_time() - cpu_start, last


def dilo_loop(dilo_args: list[str], run_dir: Path) -> tuple[float, float, float]:
    """dilo's Trainer for the same steps; (wall s, CPU s, last loss), the final sync excluded."""
    from dilo.train import Trainer

    cfg = check_config([*dilo_args, "--run.dir", str(run_dir)])
    trainer = Trainer(cfg)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = trainer.run()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        trainer.close()
    last = [r for r in metrics(run_dir, 0) if r["kind"] == "inner"][-1]
    if last["step"] != cfg.run.steps:
        raise ToolError(f"dilo's last metrics line is at step {last['step']}, not {cfg.run.steps}")
    sync = summary["sync_seconds"]  # a lone worker's outer step: CPU-bound, so CPU ~ wall
    return wall - sync, cpu - sync, last["loss"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_overhead", description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE is passed to both loops' config.")
    p.add_argument("--quick", action="store_true", help="a smaller model, 30 steps, 5 repeats")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"), help="dilo TOML preset")
    p.add_argument("--steps", type=int, help="steps per timed loop (default 40)")
    p.add_argument("--repeats", type=int, help="timed pairs (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: steadier)")
    p.add_argument("--out", default="runs/bench/overhead.json", help="JSON output")
    args, dilo_args = p.parse_known_args(argv)
    for a in dilo_args:
        if a.startswith("--") and "." not in a.split("=")[0]:
            raise ToolError(f"unknown option {a}; dilo keys look like --section.key")
    args.steps = args.steps or (30 if args.quick else 40)
    args.repeats = args.repeats or (5 if args.quick else 7)
    if args.steps < 2 or args.repeats < 1 or args.threads < 1:
        raise ToolError("--steps must be >= 2, --repeats and --threads >= 1")
    args.dilo_args = ["--config", args.config, *(QUICK if args.quick else []), *dilo_args,
                      "--run.mode", "diloco", "--run.steps", str(args.steps),
                      "--outer.inner_steps", str(args.steps), "--run.threads", str(args.threads),
                      "--metrics.progress", "off", "--metrics.port", "0", "--checkpoint.every", "0",
                      "--data.eval_every", "0"]
    check_config(args.dilo_args)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from dilo.data import eval_batches, load_tokens

    logging.getLogger("dilo").setLevel(logging.WARNING)  # one "done" line per repeat is noise
    cfg = check_config(args.dilo_args)
    torch.set_num_threads(args.threads)
    tokens, val = load_tokens(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction)
    eval_set = eval_batches(val if len(val) else tokens, cfg.data.batch_size, cfg.model.seq_len,
                            cfg.data.eval_batches)
    ratios, wall_ratios, dilo_s, bare_s, loss_gaps = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_overhead-") as tmp:
        for rep in range(args.repeats + 1):  # repeat 0 warms caches and the allocator: dropped
            order = ("dilo", "bare") if rep % 2 == 0 else ("bare", "dilo")
            got = {}
            for which in order:
                if which == "dilo":
                    got["dilo"] = dilo_loop(args.dilo_args, Path(tmp) / f"rep-{rep}")
                else:
                    got["bare"] = bare_loop(cfg, tokens, eval_set)
                torch.set_num_threads(args.threads)  # the Trainer sets its own; keep both equal
            (d_wall, d, d_loss), (b_wall, b, b_loss) = got["dilo"], got["bare"]
            if rep == 0:
                continue
            ratios.append(d / b)
            wall_ratios.append(d_wall / b_wall)
            dilo_s.append(d)
            bare_s.append(b)
            loss_gaps.append(abs(d_loss - b_loss))
            print(f"bench_overhead: repeat {rep}/{args.repeats}: CPU dilo {d:.3f} s, bare {b:.3f} s, "
                  f"ratio {d / b:.4f} (wall {d_wall / b_wall:.4f})", file=sys.stderr, flush=True)
    ratio = describe(ratios)
    results = {"ratio": ratio, "overhead_percent": 100 * (ratio["median"] - 1),
               "wall_ratio": describe(wall_ratios),
               "dilo_cpu_seconds": describe(dilo_s), "bare_cpu_seconds": describe(bare_s),
               "max_last_loss_gap": max(loss_gaps), "same_loss": max(loss_gaps) < 1e-4}
    settings = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                "dilo_args": args.dilo_args}
    write_json(args.out, document("bench_overhead", settings, results))
    print(f"dilo / bare loop CPU time: median {ratio['median']:.4f} (min {ratio['min']:.4f}, "
          f"max {ratio['max']:.4f}) over {args.repeats} repeats: overhead "
          f"{results['overhead_percent']:+.2f}% (wall: median {results['wall_ratio']['median']:.4f}); "
          f"last losses agree: {results['same_loss']}")
    if not results["same_loss"]:
        raise ToolError(f"the two loops did different work (last losses differ by "
                        f"{max(loss_gaps):.3g}); the ratio is meaningless — see {args.out}")
    print(f"bench_overhead: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_overhead"))
