"""Adapters vs full DiLoCo on new data: gain on the new domain, forgetting of the old one,
bytes per sync (docs/adapters.md).

    flock /work/lead/heavy.lock python tools/bench_adapters.py --out docs/results/adapters.json \\
        --png docs/img/adapters.png
    python tools/bench_adapters.py --quick --out runs/bench/adapters.json     # seconds, a smoke test

This Python's stdlib sources are split by top-level package name into two halves (the
first half of the sorted names is "old", the second "new"). M workers pretrain with full
DiLoCo on the old half; from that checkpoint (`checkpoint.init_from`) four continuations
train on the new half for the same number of steps:

- `full`: full DiLoCo (every parameter trained and exchanged);
- `lora naive`, `lora frozen_a`, `lora exact`: `model.lora_rank` r on the frozen base,
  `outer.lora_aggregate` naive / frozen_a / exact (LoRA inner LR --lora-lr).

Each final global model (read back from the run's last checkpoint) and the base are
evaluated on held-out blocks of both halves (the continuations repeated for each of
--seeds, run.seed: data order and LoRA's A; the table gives medians): new-half gain = base loss − final loss on
the new half; old-half forgetting = final loss − base loss on the old half. Bytes per
sync are the counted bytes each worker sent per outer step (summary bytes_sent /
outer_steps; exact includes its all-gather of the adapters). Every run goes through
dilo's CLI; the machine may be shared (wall times are not compared).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import sysconfig
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.report import ToolError, document, png_path, require_matplotlib, run_tool, write_json  # noqa: E402
from tools.runs import REPO, check_config, run_logged, summaries, train_cmd  # noqa: E402

VARIANTS = ("full", "lora naive", "lora frozen_a", "lora exact")


def split_stdlib(out_dir: Path, max_bytes: int) -> tuple[Path, Path, dict]:
    """old.txt (first half of the sorted top-level stdlib names) and new.txt (second half)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0].removesuffix(".py")
        if top in ("test", "site-packages", "idlelib", "lib2to3", "__pycache__") or top.startswith("_"):
            continue
        files.setdefault(top, []).append(path)
    names = sorted(files)
    halves = {"old": names[:len(names) // 2], "new": names[len(names) // 2:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for half, members in halves.items():
        data, used = bytearray(), []
        for name in members:
            for path in files[name]:
                data += path.read_bytes() + b"\n"
            used.append(name)
            if len(data) >= max_bytes:
                break
        paths[half] = out_dir / f"{half}.txt"
        paths[half].write_bytes(bytes(data[:max_bytes]))
        halves[half] = used
    info = {half: {"packages": len(members), "first": members[0], "last": members[-1]}
            for half, members in halves.items()}
    return paths["old"], paths["new"], info


def last_checkpoint(run_dir: Path) -> Path:
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    if not steps:
        raise ToolError(f"{run_dir} holds no checkpoint")
    return steps[-1]


def evaluate_final(args_list: list[str], step_dir: Path | None, old: Path, new: Path) -> dict[str, float]:
    """Loss of the run's final global model (or the base, step_dir None) on both halves."""
    import torch

    from dilo import checkpoint
    from dilo.global_layout import write_flat
    from dilo.inner_loop import evaluate, load_data
    from dilo.model_build import build_model

    cfg = check_config(args_list)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, torch.device("cpu")).model
    if step_dir is not None:
        state = checkpoint.read_verified(step_dir / "worker-0.pt")
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            write_flat(trainable, state["diloco"]["global_params"])
        model.load_state_dict(state["model_rest"], strict=False)
    losses = {}
    for half, path in (("old", old), ("new", new)):
        c = copy.deepcopy(cfg)
        c.data.path = str(path)
        with torch.no_grad():
            losses[half] = evaluate(model, load_data(c, 0, 1, 1)[1], torch.device("cpu"))
    return losses


def run(name: str, args_list: list[str], run_dir: Path, nproc: int, timeout: float) -> dict:
    start = time.time()
    print(f"bench_adapters: {name}", file=sys.stderr, flush=True)
    check_config(args_list)
    run_logged(train_cmd([*args_list, "--run.dir", str(run_dir)], nproc), run_dir.with_suffix(".log"),
               timeout, name)
    s = summaries(run_dir)[0]
    return {"seconds": time.time() - start, "synced_params": s["synced_params"],
            "outer_steps": s["outer_steps"], "bytes_sent_per_sync": s["bytes_sent"] / max(1, s["outer_steps"]),
            "global_hash": s["global_hash"]}


def median_row(name: str, runs: list[dict]) -> dict:
    """One variant over its seeds: medians of the losses, gain and forgetting, min/max of the gain."""
    row = {"variant": name, "seeds": [r["seed"] for r in runs], "synced_params": runs[0]["synced_params"],
           "bytes_sent_per_sync": statistics.median(r["bytes_sent_per_sync"] for r in runs)}
    for key in ("new_loss", "old_loss", "new_gain", "old_forgetting"):
        row[key] = statistics.median(r[key] for r in runs)
        row[key + "_range"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
    return row


def plot(rows: list[dict], path: Path) -> None:
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["variant"] for r in rows]
    for ax, key, title in zip(axes, ("new_gain", "old_forgetting", "bytes_sent_per_sync"),
                              ("new-half gain (loss drop)", "old-half forgetting (loss rise)",
                               "bytes sent per sync")):
        ax.bar(names, [r[key] for r in rows], color=["#555", "#c44", "#48c", "#4a4"][:len(rows)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        if key == "bytes_sent_per_sync":
            ax.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=120, help="steps of each continuation on the new half")
    p.add_argument("--H", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="qkv,proj,fc,fc_out")
    p.add_argument("--lora-lr", type=float, default=5e-3)
    p.add_argument("--max-bytes", type=int, default=1_500_000, help="bytes of each half")
    p.add_argument("--seeds", default="0", help="comma-separated run.seed of the continuations (one "
                   "pretraining, seed 0); the table gives each variant's median over them")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (smoke test)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench_adapters")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", required=True)
    p.add_argument("--png", default=None)
    args, rest = p.parse_known_args(argv)
    args.dilo_args = rest
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    if args.quick:
        args.pretrain_steps, args.steps, args.H, args.max_bytes = 20, 10, 5, 300_000
        args.dilo_args = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                          "--model.seq_len", "32", "--data.batch_size", "4", *args.dilo_args]
    runs_dir = args.runs_dir
    if runs_dir.exists() and any(runs_dir.iterdir()):
        raise ToolError(f"--runs-dir {runs_dir} is not empty; remove it or choose another")
    old, new, halves = split_stdlib(runs_dir / "data", args.max_bytes)
    common = ["--config", args.config, "--outer.inner_steps", str(args.H), "--comm.codec", "int8",
              "--metrics.progress", "off", "--run.threads", "1", "--data.eval_batches", "8",
              "--data.max_bytes", str(args.max_bytes), *args.dilo_args]
    pre_args = [*common, "--data.path", str(old), "--run.steps", str(args.pretrain_steps),
                "--checkpoint.every", "1", "--checkpoint.keep", "1"]
    pretrain = run("pretrain (old half)", pre_args, runs_dir / "pretrain", args.workers, args.timeout)
    base = last_checkpoint(runs_dir / "pretrain")
    cont = [*common, "--data.path", str(new), "--run.steps", str(args.steps), "--checkpoint.every", "1",
            "--checkpoint.keep", "1", "--inner.warmup_steps", str(max(1, args.steps // 10)),
            "--checkpoint.init_from", str(base)]
    variants = {"full": cont}
    for rule in ("naive", "frozen_a", "exact"):
        variants[f"lora {rule}"] = [*cont, "--model.lora_rank", str(args.rank), "--model.lora_targets",
                                    args.targets, "--outer.lora_aggregate", rule, "--inner.lr", str(args.lora_lr)]
    base_loss = evaluate_final(pre_args, base, old, new)
    runs = []
    for seed in args.seeds:
        for name, vargs in variants.items():
            vargs = [*vargs, "--run.seed", str(seed)]
            run_dir = runs_dir / f"{name.replace(' ', '-')}-seed{seed}"
            row = {"variant": name, "seed": seed, **run(f"{name} seed {seed}", vargs, run_dir, args.workers,
                                                         args.timeout)}
            loss = evaluate_final(vargs, last_checkpoint(run_dir), old, new)
            row.update(old_loss=loss["old"], new_loss=loss["new"], new_gain=base_loss["new"] - loss["new"],
                       old_forgetting=loss["old"] - base_loss["old"])
            runs.append(row)
            print(f"bench_adapters:   new {loss['new']:.4f} (gain {row['new_gain']:+.4f}), old {loss['old']:.4f} "
                  f"(forgetting {row['old_forgetting']:+.4f}), {row['bytes_sent_per_sync'] / 1e3:.1f} kB/sync, "
                  f"{row['synced_params']} synced params", file=sys.stderr, flush=True)
    rows = [median_row(name, [r for r in runs if r["variant"] == name]) for name in variants]
    settings = {k: v for k, v in vars(args).items() if k not in ("runs_dir", "out", "png")}
    settings.update(halves=halves, commands={"pretrain": " ".join(train_cmd(pre_args, args.workers)),
                                             **{n: " ".join(train_cmd(v, args.workers)) for n, v in variants.items()}})
    write_json(args.out, document("bench_adapters", settings,
                                  {"base": base_loss, "pretrain": pretrain, "variants": rows, "runs": runs}))
    for r in rows:
        print(f"{r['variant']:14} new gain {r['new_gain']:+.4f}  old forgetting {r['old_forgetting']:+.4f}  "
              f"bytes/sync {r['bytes_sent_per_sync']:>12.0f}  synced {r['synced_params']}")
    if picture:
        plot(rows, picture)
    print(f"bench_adapters: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_adapters"))
