"""Codec encode/decode and the finiteness check, each as a multiple of a memcpy of its input.

    python tools/bench_codecs.py --out docs/results/codecs.json --png docs/img/codecs.png
    python tools/bench_codecs.py --quick --out runs/bench/codecs.json
    python tools/bench_codecs.py --codecs int2,sparse --sizes 16M,64M --repeats 5 \
        --out docs/results/codecs_i12e.json --png docs/img/codecs_i12e.png

Single thread (`torch.set_num_threads(1)`; the numba kernels are single-threaded). For
each size the fp32 input `x` (random normal, scaled like a pseudo-gradient) and every
output are allocated once, so page faults are not measured. One round times, per
operation, a `dst.copy_(x)` into a preallocated fp32 tensor and then the operation;
the ratio op / copy is taken within that pair, and the JSON reports the median and the
spread of both the seconds and the ratios over `--repeats` rounds.

Operations: `encode` (`codec.encode(x, out=buf)`), `decode` (`codec.decode(buf, n,
out=y)`) for every codec, `finite` (`codec_kernels.all_finite(x)`), `max_abs`
(`reduce_kernels.max_abs(x)`: finiteness and a cast codec's limit in one pass), and for
int8/fp4 `owner_add`: one contribution into the owner's fp32 sum (numba: screened and
added from its bytes; torch: decode, `all_finite`, `add_`). `path` says
which implementation ran: `numba` (dilo/codec_kernels.py for int8/fp4,
dilo/int2_kernels.py and dilo/sparse_kernels.py for int2/sparse) or `torch` (the code dilo runs without numba;
int8, fp4, int2 and sparse (density 0.02, 2-bit values, blocks of 4096: its defaults) are
measured on both, the cast codecs have only the torch one). Both paths' bytes, encoded and
decoded, are compared at every size (`same_bytes`). `--codecs` picks the codecs (the
`finite` and `max_abs` rows come with every run).

`--startup` (on by default when numba is installed) times, in fresh processes, what
the kernels add to a process start: compiling them with an empty cache (`cold`) and
loading them from numba's on-disk cache (`cached`, median of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dilo import codec_kernels, reduce_kernels  # noqa: E402
from dilo.codecs import CODEC_NAMES, get_codec  # noqa: E402
from tools.report import (ToolError, describe, document, png_path, require_matplotlib,  # noqa: E402
                          run_tool, write_json)

REPO = Path(__file__).resolve().parents[1]
KERNEL_CODECS = ("int8", "fp4", "int2", "sparse")
OWNER_ADD_CODECS = ("int8", "fp4")  # those with a fused owner-side add (dilo/reduce_kernels.py)
# What a fresh process pays for the kernels: import, then the first call of each one.
STARTUP_PROBE = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from dilo import codec_kernels
from dilo.codecs import get_codec
t2 = time.perf_counter()
x = torch.randn(1000)
for name in ("int8", "fp4", "int2", "sparse"):
    c = get_codec(name)
    c.decode(c.encode(x), 1000)
codec_kernels.all_finite(x)
t3 = time.perf_counter()
print(json.dumps({"backend": codec_kernels.BACKEND, "import_torch_s": t1 - t0,
                  "import_dilo_codecs_s": t2 - t1, "first_calls_s": t3 - t2}))
"""


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise ToolError(f"--sizes: {text!r} is not a size like 1M or 16M") from None


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def operations(n: int, x: torch.Tensor, args: argparse.Namespace, paths: list[str]):
    """(codec, op, path, callable) for every measured operation at size n."""
    ops, block_size = [], args.block_size
    y, total = torch.empty(n, dtype=torch.float32), torch.zeros(n, dtype=torch.float32)
    for name in args.codecs:
        codec = get_codec(name, block_size)
        buf = torch.empty(codec.encoded_nbytes(n), dtype=torch.uint8)
        for path in paths if name in KERNEL_CODECS else ["torch"]:
            ops.append((name, "encode", path, lambda c=codec, b=buf: c.encode(x, out=b)))
            ops.append((name, "decode", path, lambda c=codec, b=buf: c.decode(b, n, out=y)))
            if name in OWNER_ADD_CODECS:  # after encode: buf holds real bytes
                ops.append((name, "owner_add", path, _owner_add(codec, buf, n, y, total, path)))
    for path in paths:
        ops.append(("-", "finite", path, lambda: codec_kernels.all_finite(x)))
        ops.append(("-", "max_abs", path, lambda: reduce_kernels.max_abs(x)))
    return ops


def _owner_add(codec, buf: torch.Tensor, n: int, y: torch.Tensor, total: torch.Tensor, path: str):
    """One contribution into the owner's sum: numba screens and adds from the bytes
    (dilo/reduce_kernels.py); torch decodes, checks finiteness, then adds (the path before)."""
    if path == "numba":  # (the backend is selected when the op runs)
        def fused():
            screen, add = reduce_kernels.fused_contribution(codec)
            return screen(buf, n) and add(buf, total, False)
        return fused
    return lambda: (codec.decode(buf, n, out=y), codec_kernels.all_finite(y), total.add_(y))


def same_bytes(x: torch.Tensor, block_size: int, codecs: list[str]) -> bool | None:
    if "numba" not in available_paths() or not set(codecs) & set(KERNEL_CODECS):
        return None
    results = []
    for path in ("numba", "torch"):
        codec_kernels.use_backend(path)
        for name in (c for c in codecs if c in KERNEL_CODECS):
            codec = get_codec(name, block_size)
            buf = codec.encode(x)
            results.append((path, name, buf, codec.decode(buf, x.numel()).view(torch.int32)))
    half = len(results) // 2
    return all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
               for a, b in zip(results[:half], results[half:]))


def available_paths() -> list[str]:
    return ["numba", "torch"] if codec_kernels.numba is not None else ["torch"]


def measure_size(n: int, args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 1e-3
    dst = torch.empty_like(x)
    paths = available_paths()
    agree = same_bytes(x, args.block_size, args.codecs)
    ops = operations(n, x, args, paths)
    samples = {(c, o, p): {"s": [], "copy_s": [], "ratio": []} for c, o, p, _ in ops}
    for _ in range(args.warmup):
        for codec, op, path, fn in ops:
            codec_kernels.use_backend(path)
            dst.copy_(x)
            fn()
    for _ in range(args.repeats):
        for codec, op, path, fn in ops:
            codec_kernels.use_backend(path)
            t_copy = timed(lambda: dst.copy_(x))
            t_op = timed(fn)
            s = samples[codec, op, path]
            s["s"].append(t_op)
            s["copy_s"].append(t_copy)
            s["ratio"].append(t_op / t_copy)
    rows = []
    for (codec, op, path), s in samples.items():
        rows.append({"numel": n, "codec": codec, "op": op, "path": path,
                     "block_size": None if codec in ("-", "fp32", "bf16", "fp16")
                     else get_codec(codec, args.block_size).block_size,
                     "seconds": describe(s["s"]), "copy_seconds": describe(s["copy_s"]),
                     "over_copy": describe(s["ratio"]), "same_bytes": agree})
    return rows


def measure_startup() -> dict:
    """Compile cost of the kernels in fresh processes: empty cache, then the cache reused."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DILO_CODEC_KERNELS", None)
    with tempfile.TemporaryDirectory(prefix="bench_codecs-numba-") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        runs = []
        for _ in range(4):
            out = subprocess.run([sys.executable, "-c", STARTUP_PROBE], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise ToolError(f"startup probe failed: {out.stderr.strip()[-500:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cached = runs[1:]
    keys = ("import_torch_s", "import_dilo_codecs_s", "first_calls_s")
    return {"cold": runs[0],
            "cached": {k: statistics.median(r[k] for r in cached) for k in keys} | {"n": len(cached)},
            "numba": codec_kernels.NUMBA_VERSION}


def plot(doc: dict, path: Path) -> None:
    plt = require_matplotlib()
    rows = doc["results"]["rows"]
    sizes = sorted({r["numel"] for r in rows})
    labels = []
    for r in rows:
        label = r["op"] if r["codec"] == "-" else f"{r['codec']}\n{r['op']}"
        if label not in labels:
            labels.append(label)
    paths = sorted({r["path"] for r in rows})
    fig, axes = plt.subplots(len(sizes), 1, figsize=(11, 3.2 * len(sizes)), squeeze=False)
    width = 0.8 / len(paths)
    for ax, n in zip(axes[:, 0], sizes):
        for k, p in enumerate(paths):
            xs, ys = [], []
            for i, label in enumerate(labels):
                for r in rows:
                    lab = r["op"] if r["codec"] == "-" else f"{r['codec']}\n{r['op']}"
                    if r["numel"] == n and r["path"] == p and lab == label:
                        xs.append(i + (k - (len(paths) - 1) / 2) * width)
                        ys.append(r["over_copy"]["median"])
            ax.bar(xs, ys, width, label=f"{p} path")
        ax.axhline(1.5, color="k", lw=0.8, ls="--", label="1.5x target")
        ax.axhline(1.0, color="gray", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("time / memcpy (median)")
        ax.set_title(f"{n / 2**20:g}M fp32 elements, single thread", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_codecs", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,16M,64M", help="element counts, comma-separated")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per size")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per size")
    p.add_argument("--block-size", type=int, default=256, help="int8/fp4/int2 block size")
    p.add_argument("--codecs", default=",".join(CODEC_NAMES), help="codecs to measure, comma-separated")
    p.add_argument("--startup", choices=("auto", "on", "off"), default="auto",
                   help="time the kernels' compile in fresh processes (auto: when numba is installed)")
    p.add_argument("--quick", action="store_true", help="sizes 1M,4M, 3 repeats, no startup")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    p.add_argument("--out", default="runs/bench/codecs.json", help="JSON output")
    p.add_argument("--png", default=None, help="picture (default: the JSON path with .png; '' = none)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.startup = "1M,4M", 3, "off"
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [c for c in args.codecs if c not in CODEC_NAMES]
    if unknown or not args.codecs:
        raise ToolError(f"--codecs: {', '.join(unknown) or 'none given'}; choose from {', '.join(CODEC_NAMES)}")
    if args.repeats < 1 or args.block_size < 1 or not args.sizes:
        raise ToolError("--repeats and --block-size must be >= 1 and --sizes non-empty")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()
    torch.set_num_threads(1)
    settings = {"sizes": args.sizes, "repeats": args.repeats, "warmup": args.warmup,
                "block_size": args.block_size, "codecs": args.codecs, "threads": 1, "note": args.note,
                "numba": codec_kernels.NUMBA_VERSION, "paths": available_paths()}
    startup = None
    if args.startup == "on" or (args.startup == "auto" and codec_kernels.numba is not None):
        print("bench_codecs: timing the kernels' compile in fresh processes", file=sys.stderr)
        startup = measure_startup()
    rows: list[dict] = []
    before = codec_kernels.BACKEND
    try:
        for n in args.sizes:
            print(f"bench_codecs: {n} elements x {args.repeats} rounds", file=sys.stderr, flush=True)
            rows += measure_size(n, args)
    finally:
        codec_kernels.BACKEND = before
    doc = document("bench_codecs", settings, {"rows": rows, "startup": startup})
    write_json(args.out, doc)
    for r in rows:
        print(f"{r['numel']:>9} {r['codec']:6} {r['op']:6} {r['path']:5} "
              f"{r['seconds']['median'] * 1e3:9.3f} ms  x copy {r['over_copy']['median']:6.2f} "
              f"(min {r['over_copy']['min']:.2f} max {r['over_copy']['max']:.2f})")
    if startup:
        print(f"startup: cold {startup['cold']['import_dilo_codecs_s'] + startup['cold']['first_calls_s']:.2f} s, "
              f"cached {startup['cached']['import_dilo_codecs_s'] + startup['cached']['first_calls_s']:.2f} s "
              "(import dilo.codecs + first calls)")
    if picture:
        plot(doc, picture)
    print(f"bench_codecs: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_codecs"))
