"""Continual learning on a watched folder: three domains arrive one after another.

    flock /work/lead/heavy.lock python tools/bench_continual.py \\
        --out docs/results/continual.json --png docs/img/continual.png

Domains (each skipped, with the reason in the JSON, if this machine lacks it): `code` (the
standard library's .py sources), `headers` (C headers under /usr/include), `docs` (plain
text files under /usr/share/doc). Each domain gives one training shard of --train-bytes
and a disjoint held-out set of --eval-bytes (the next bytes of the same files).

For each data.replay value (default 0, 0.1, 0.25) one run of --workers workers (torchrun,
data.watch on a fresh folder, constant LR after warmup: inner.min_lr_ratio 1) goes through
the phases: before phase k the tool copies domain k's shard into the watched folder and
continues the run (checkpoint.resume auto) for exactly the steps that read that shard's
fresh rows once (rows // (workers x fresh rows per step), a multiple of H; a replayed
row is not a fresh one, so replay runs get more steps for the same new data). After every
phase the run's final evaluation logs each domain's held-out loss (eval.sets); the table
is domain x phase per replay value: forgetting = an old domain's loss rising after a later
phase, gain = the new domain's drop.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo.data import _is_text, embedded_corpus_files  # noqa: E402
from tools.report import ToolError, document, png_path, require_matplotlib, run_tool, write_json  # noqa: E402
from tools.runs import metrics, run_logged, summaries, train_cmd  # noqa: E402

MODEL = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2",
         "--model.seq_len", "64", "--data.batch_size", "4", "--data.eval_batches", "8",
         "--inner.warmup_steps", "20", "--inner.min_lr_ratio", "1", "--run.threads", "1",
         "--metrics.progress", "off", "--data.val_fraction", "0"]


def domain_files(name: str) -> list[Path]:
    if name == "code":
        return embedded_corpus_files()
    root, pattern = {"headers": (Path("/usr/include"), "*.h"), "docs": (Path("/usr/share/doc"), "*")}[name]
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".gz", ".xz", ".bz2", ".html", ".png", ".pdf"))
    return files


def domain_text(name: str, budget: int) -> bytes | str:
    """`budget` bytes of the domain's UTF-8 text files, or the reason there are not enough."""
    parts, size = [], 0
    for f in domain_files(name):
        try:
            raw = f.read_bytes()
        except OSError:
            continue
        if raw and _is_text(raw):
            parts.append(raw)
            size += len(raw) + 1
            if size >= budget:
                return b"\n".join(parts)[:budget]
    return f"{name}: only {size} bytes of UTF-8 text found, need {budget}"


def phase_steps(shard_bytes: int, workers: int, batch: int, seq_len: int, replay: float, H: int,
                first: bool) -> int:
    lanes = workers * batch
    rows = lanes * ((shard_bytes // lanes - 1) // seq_len)
    fresh = batch * (1.0 if first else 1.0 - replay)  # on average (dilo/data_stream.py)
    return (int(rows / (workers * fresh)) - 1) // H * H  # never past the shard


def run_replay(args, replay: float, domains: dict[str, bytes], work: Path) -> dict:
    data, run = work / f"data-r{replay}", work / f"run-r{replay}"
    shutil.rmtree(data, ignore_errors=True), shutil.rmtree(run, ignore_errors=True)
    data.mkdir(parents=True)
    sets = ",".join(f"{n}={work / 'eval' / (n + '.txt')}" for n in domains)
    total, table = 0, {n: [] for n in domains}
    for k, (name, text) in enumerate(domains.items()):
        (data / f"{k + 1}-{name}.txt").write_bytes(text[:args.train_bytes])
        steps = phase_steps(args.train_bytes, args.workers, 4, 64, replay, args.H, first=k == 0)
        if steps < args.H:
            raise ToolError(f"--train-bytes {args.train_bytes} gives less than one outer step per phase")
        total += steps
        cmd = train_cmd([*MODEL, "--run.dir", str(run), "--run.steps", str(total),
                         "--outer.inner_steps", str(args.H), "--data.watch", "true",
                         "--data.path", str(data), "--data.replay", str(replay),
                         "--eval.sets", sets, "--checkpoint.every", "1000000",
                         "--checkpoint.resume", "auto"], nproc=args.workers)
        run_logged(cmd, work / f"log-r{replay}-{k}.txt", args.timeout, f"replay {replay} phase {k + 1}")
        last = {}
        for r in metrics(run, 0):
            if r.get("kind") == "eval" and "set" in r:
                last[r["set"]] = r["set_loss"]
        for n in domains:
            table[n].append(last[n])
        print(f"replay {replay} after phase {k + 1} ({name}, {steps} steps): "
              + ", ".join(f"{n} {last[n]:.3f}" for n in domains), flush=True)
    ends = summaries(run)
    if len({s["global_hash"] for s in ends}) != 1:
        raise ToolError(f"replay {replay}: workers ended on different global hashes")
    return {"replay": replay, "steps": total, "eval_loss": table,
            "global_hash": ends[0]["global_hash"][:16]}


def bench(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    (work / "eval").mkdir(parents=True, exist_ok=True)
    domains, skipped = {}, {}
    for name in ("code", "headers", "docs"):
        text = domain_text(name, args.train_bytes + args.eval_bytes)
        if isinstance(text, str):
            skipped[name] = text
            continue
        domains[name] = text
        (work / "eval" / f"{name}.txt").write_bytes(text[args.train_bytes:])
    if len(domains) < 2:
        raise ToolError(f"fewer than two domains on this machine: {skipped}")
    results = [run_replay(args, r, domains, work) for r in args.replay]
    for res in results:
        names = list(res["eval_loss"])
        res["forgetting"] = {n: res["eval_loss"][n][-1] - res["eval_loss"][n][i]
                             for i, n in enumerate(names[:-1])}
        res["gain"] = {n: res["eval_loss"][n][i - 1] - res["eval_loss"][n][i]
                       for i, n in enumerate(names) if i > 0}
    settings = {"workers": args.workers, "H": args.H, "train_bytes": args.train_bytes,
                "eval_bytes": args.eval_bytes, "replay": args.replay, "model": MODEL,
                "domains": list(domains), "skipped": skipped,
                "note": "the machine's 2 cores were shared with other jobs; losses, not times, are reported"}
    doc = document("bench_continual", settings, results)
    write_json(args.out, doc)
    if (png := png_path(args.out, args.png)) is not None:
        plot(results, list(domains), png)
    return doc


def plot(results: list[dict], names: list[str], png: Path) -> None:
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True)
    for ax, name in zip(axes, names):
        for res in results:
            ax.plot(range(1, len(names) + 1), res["eval_loss"][name], marker="o", label=f"replay {res['replay']}")
        ax.set_title(f"held-out {name}")
        ax.set_xticks(range(1, len(names) + 1), [f"after {n}" for n in names])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss (nats/byte)")
    axes[0].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/continual.json")
    p.add_argument("--png", default=None, help="default: docs/img/<out name>.png")
    p.add_argument("--work", default="runs/bench/continual")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--H", type=int, default=10)
    p.add_argument("--train-bytes", type=int, default=120_000)
    p.add_argument("--eval-bytes", type=int, default=20_000)
    p.add_argument("--replay", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.1, 0.25])
    p.add_argument("--timeout", type=float, default=900)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    bench(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_continual"))
