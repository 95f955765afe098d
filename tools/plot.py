"""Loss, throughput and bytes curves of dilo runs, from their metrics-*.jsonl, to one PNG.

    python tools/plot.py runs/tiny --out runs/tiny/curves.png
    python tools/plot.py runs/a runs/b/metrics-0.jsonl --labels H=20,H=100 --out compare.png

Each argument is a run directory (all its metrics-<worker>.jsonl are read) or one
metrics file. Panels, against the inner step:
1. loss: training loss of worker 0 (line) and eval loss (dots);
2. throughput: tokens/s of all the run's workers together (the sum at each logged step);
3. bytes: cumulative bytes sent by worker 0 in outer exchanges (from its `sync` lines;
   a data-parallel run has none: its bytes are only estimated in the summary).
Needs matplotlib (`pip install matplotlib`, or the `tools` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo.metrics import read_jsonl  # noqa: E402
from tools.report import ToolError, require_matplotlib, run_tool  # noqa: E402


def load(source: str) -> dict[int, list[dict]]:
    """{worker: records} of a run directory or of a single metrics file."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("metrics-*.jsonl"))
        if not files:
            raise ToolError(f"{path} holds no metrics-*.jsonl; is it a dilo run.dir?")
    elif path.is_file():
        files = [path]
    else:
        raise ToolError(f"{source}: no such run directory or metrics file")
    runs = {}
    for f in files:
        try:
            worker = int(f.stem.split("-", 1)[1])
        except (IndexError, ValueError):
            raise ToolError(f"{f}: expected a name like metrics-<worker>.jsonl") from None
        runs[worker] = read_jsonl(f)
    return runs


def curves(run: dict[int, list[dict]]) -> dict[str, list[tuple[float, float]]]:
    """The plotted series: (step, value) pairs."""
    first = run[min(run)]
    train = [(r["step"], r["loss"]) for r in first if r["kind"] == "inner"]
    evals = [(r["step"], r["eval_loss"]) for r in first if r["kind"] == "eval"
             and r.get("eval_loss") is not None]
    by_step: dict[int, float] = {}
    for records in run.values():
        for r in records:
            if r["kind"] == "inner" and r.get("tokens_per_s") is not None:
                by_step[r["step"]] = by_step.get(r["step"], 0.0) + r["tokens_per_s"]
    throughput = sorted(by_step.items())
    sent, total = [(0, 0)], 0
    for r in first:
        if r["kind"] == "sync":
            total += r["bytes_sent"]
            sent.append((r["step"], total))
    sets: dict[str, list[tuple[float, float]]] = {}  # eval.sets: one curve per named set
    for r in first:
        if r["kind"] == "eval" and r.get("set_loss") is not None:
            sets.setdefault(r["set"], []).append((r["step"], r["set_loss"]))
    return {"train_loss": train, "eval_loss": evals, "tokens_per_s": throughput,
            "bytes_sent": sent if total else [], "set_loss": sets}


def plot(sources: list[str], labels: list[str], out: Path) -> None:
    plt = require_matplotlib()
    data = [curves(load(s)) for s in sources]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (c, label) in enumerate(zip(data, labels)):
        color = colors[i % len(colors)]
        if c["train_loss"]:
            axes[0].plot(*zip(*c["train_loss"]), color=color, lw=1, alpha=0.8, label=f"{label} train")
        if c["eval_loss"]:
            axes[0].plot(*zip(*c["eval_loss"]), "o--", color=color, ms=4, label=f"{label} eval")
        for j, (name, points) in enumerate(sorted(c["set_loss"].items())):
            axes[0].plot(*zip(*points), ":", marker="xs^dv"[j % 5], color=color, ms=4, label=f"{label} {name}")
        if c["tokens_per_s"]:
            axes[1].plot(*zip(*c["tokens_per_s"]), color=color, label=label)
        if c["bytes_sent"]:
            xs, ys = zip(*c["bytes_sent"])
            axes[2].step(xs, [y / 1e6 for y in ys], where="post", color=color, label=label)
    axes[0].set(xlabel="inner step", ylabel="loss", title="loss")
    axes[1].set(xlabel="inner step", ylabel="tokens/s (all workers)", title="throughput")
    axes[2].set(xlabel="inner step", ylabel="MB sent (worker 0)", title="bytes in outer exchanges")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="plot", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="run directories or metrics-<worker>.jsonl files")
    p.add_argument("--labels", help="comma list, one per source (default: the paths)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else args.sources
    if len(labels) != len(args.sources):
        raise ToolError(f"--labels has {len(labels)} names for {len(args.sources)} sources")
    plot(args.sources, labels, Path(args.out))
    print(f"plot: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="plot"))
