"""Bytes per sync of the sparse codec's exchange designs against the dense codecs, by group size M.

    python tools/bench_sparse_bytes.py --out docs/results/sparse_bytes.json --png docs/img/sparse_bytes.png

Each of M members holds a synthetic pseudo-gradient of --numel elements: a component shared
by all members (weight --shared) plus its own, both normal with a per-element log-normal scale
(heavy tails, and top entries that partly coincide between members, as real Δs do). Bytes
are what one member sends per sync (received is the same), for:

- `fp4`, `int8`, `int2` (two-phase) and `sparse` (all-gather, dilo/comm/gather.py):
  **measured**, dilo's own exchange over in-process groups (ExchangeResult.bytes_sent);
- `sparse two-phase, re-sparsified` (design a, `comm.sparse_exchange two_phase`): phase 1
  sends M − 1 chunks' sparse encodings, phase 2 the owner's mean re-sparsified at the same
  density to M − 1 members: 2 (M − 1) S(chunk), **measured** as well. Its owner's second
  top-k loses what the members' error feedback counted as sent (`comm.owner_feedback`);
- `sparse two-phase, exact union` (design a', not in dilo): phase 2 carries every offset any member
  kept in the owner's chunk, with 8-bit values, in the sparse format at the union's
  count (counted from the members' actual selections).

Also per M: the ratio of fp4's bytes to each (the issue's goal: sparse ≤ 1/8 of fp4's).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dilo.codecs import get_codec  # noqa: E402
from dilo.comm.local import local_groups  # noqa: E402
from dilo.comm.protocol import chunk_numel  # noqa: E402
from tools.report import ToolError, document, png_path, require_matplotlib, run_tool, write_json  # noqa: E402

DENSE = ("fp4", "int8", "int2")


def contributions(members: int, numel: int, shared: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(numel, generator=g))
    common = torch.randn(numel, generator=g) * scale
    return [(shared * common + (1 - shared) * torch.randn(numel, generator=g) * scale) * 1e-3
            for _ in range(members)]


def measured(codec, xs: list[torch.Tensor]) -> int:
    groups = local_groups(len(xs))
    results = [None] * len(xs)

    def run(rank: int) -> None:
        results[rank] = groups[rank].average(xs[rank], codec)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    sent = {r.bytes_sent for r in results}
    if len(sent) != 1:
        raise ToolError(f"{codec.name}: members sent different byte counts {sent}")
    return sent.pop()


def union_bytes(sparse, xs: list[torch.Tensor], chunk: int, members: int) -> int:
    """Design a': per owner chunk, the sparse format at the union's count with 8-bit values."""
    b = sparse.block_size
    kept = [sparse.decode(sparse.encode(x), x.numel()) != 0 for x in xs]
    union = torch.stack(kept).any(dim=0)
    union = torch.nn.functional.pad(union, (0, chunk * members - union.numel()))
    per_block = union.view(-1, b).sum(dim=1).tolist()
    total = 0
    for count in per_block:
        count = max(1, int(count))
        low = (b // count).bit_length() - 1
        total += -(-(count + ((b - 1) >> low) + 1 + count * (low + 8)) // 8) + 8
    blocks_per_chunk = chunk // b
    own = total / members  # bytes of one owner's result (chunks are alike)
    phase1 = (members - 1) * sparse.encoded_nbytes(chunk)
    return int(phase1 + (members - 1) * own) if blocks_per_chunk else 0


def measure(args: argparse.Namespace) -> list[dict]:
    sparse = get_codec("sparse", density=args.density, value_bits=args.value_bits, sparse_block=args.sparse_block)
    rows = []
    for m in args.members:
        xs = contributions(m, args.numel, args.shared, seed=m)
        chunk = chunk_numel(args.numel, m, sparse.block_size)
        row = {"members": m, "numel": args.numel}
        for name in DENSE:
            row[name] = measured(get_codec(name, args.block_size), xs)
        row["sparse gather"] = measured(sparse, xs)
        two_phase = get_codec("sparse", density=args.density, value_bits=args.value_bits,
                              sparse_block=args.sparse_block, sparse_exchange="two_phase")
        row["sparse two-phase, re-sparsified"] = measured(two_phase, xs)
        if row["sparse two-phase, re-sparsified"] != 2 * (m - 1) * sparse.encoded_nbytes(chunk):
            raise ToolError("the two-phase sparse exchange sent other than 2 (M - 1) S(chunk)")
        row["sparse two-phase, exact union"] = union_bytes(sparse, xs, chunk, m)
        row["fp4 over"] = {k: row["fp4"] / v for k, v in row.items()
                           if k not in ("members", "numel", "fp4") and isinstance(v, int) and v}
        rows.append(row)
        print(f"M={m:3}: " + "  ".join(f"{k} {v / 1e3:.1f} kB" for k, v in row.items()
                                       if isinstance(v, int) and k not in ("members", "numel")), file=sys.stderr)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ms = [r["members"] for r in rows]
    keys = [*DENSE, "sparse gather", "sparse two-phase, re-sparsified", "sparse two-phase, exact union"]
    for key in keys:
        ax.plot(ms, [r[key] / r["numel"] * 8 for r in rows], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members M")
    ax.set_ylabel("bits sent per member per parameter per sync")
    ax.set_title("exchange bytes by design (sparse: density 0.02, 2-bit values)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_sparse_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 20, help="elements per pseudo-gradient")
    p.add_argument("--members", default="2,4,8,16", help="group sizes M, comma-separated")
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--value-bits", type=int, default=2)
    p.add_argument("--sparse-block", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=256, help="int8/fp4/int2 block size")
    p.add_argument("--shared", type=float, default=0.5, help="weight of the component all members share")
    p.add_argument("--quick", action="store_true", help="2^16 values, M = 2, 4")
    p.add_argument("--out", default="runs/bench/sparse_bytes.json")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    args = p.parse_args(argv)
    if args.quick:
        args.numel, args.members = 1 << 16, "2,4"
    args.members = [int(m) for m in args.members.split(",")]
    if any(m < 2 for m in args.members) or args.numel < 1 or not 0 <= args.shared <= 1:
        raise ToolError("--members must be >= 2, --numel >= 1, --shared in [0, 1]")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    torch.set_num_threads(1)
    rows = measure(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "png")}
    write_json(args.out, document("bench_sparse_bytes", settings, {"rows": rows}))
    if picture:
        plot(rows, picture)
    print(f"bench_sparse_bytes: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_sparse_bytes"))
