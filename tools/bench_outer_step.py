"""One full outer step ÷ the data-movement floor, and the step's peak memory, per codec and size.

    flock /work/lead/heavy.lock python tools/bench_outer_step.py --label after \\
        --out docs/results/outer_step.json --png docs/img/outer_step.png
    # the same on another checkout's dilo (e.g. main, for a before/after):
    git worktree add /tmp/base main
    flock /work/lead/heavy.lock python tools/bench_outer_step.py --repo /tmp/base --label before \\
        --out docs/results/outer_step.json --png docs/img/outer_step.png

`--ranks` gloo ranks on loopback (default 4), one thread each. For every size (elements)
and codec, each rank builds a model of that many fp32 parameters, wraps it in
`dilo.DiLoCo(inner_steps=1)` (every `step()` is a boundary: exchange, outer Nesterov step,
hash and confirm included) and times `step()` after a warm-up step, `--repeats` times,
moving the parameters by a fixed random amount before each one. The *floor* is the same
bytes through the same transport: `all_to_all_single` of the encoded chunks and
`all_gather_into_tensor` of one encoded chunk, on buffers encoded beforehand. Times are
the slowest rank's per repeat; the JSON keeps the median. `rss_copies` is the peak RSS
growth of a step on rank 0 (Linux `VmHWM` reset through `/proc/self/clear_refs` before
the step, minus `VmRSS` before it) in fp32 model copies (4 bytes × size).

`cpu_s` is rank 0's main-thread CPU time of the step (the compute, without the waiting
for the wire or the other ranks) and `cpu_passes` that ÷ the CPU time of one `copy_` of
the fp32 vector on the same rank: the step's local work in memcpy passes, a figure that
does not depend on how many ranks share the cores. `--profile` profiles rank 0's timed
steps with cProfile on the same main-thread CPU clock and keeps its top functions in the
row: CPU seconds per step and memcpy passes each.

`--digest` also times hashing θ and the momentum (2 × size fp32) with sha256, blake3 (one
thread and all cores) and the checkout's `state_digest` with torch at 1 and 2 threads (the
digest value is kept with each, to show it is one value), in the parent process. Results
from `--label` runs are merged into `--out` under that label, so before and after share one
file and one picture. The machine may be shared: ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _wait_for_digest(d) -> float:
    """Seconds until the digest thread has hashed the state the last step handed it."""
    t0 = time.perf_counter()
    d.background_digest.pending.local.result()
    return time.perf_counter() - t0


def _digest_thread_cpu(d) -> float:
    """The digest thread's CPU seconds so far (its clock: the thread lives as long as `d`)."""
    (thread,) = d.background_digest._pool._threads
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _per_step(totals: list[float]) -> list[float]:
    """Per-step increments of a running CPU clock read after each step (the first includes the
    warm-up step's digest, so it is dropped when there are more)."""
    steps = [b - a for a, b in zip(totals, totals[1:])]
    return steps or totals


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    sys.path.insert(0, args.repo)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    from dilo import DiLoCo
    from dilo.codecs import get_codec
    from dilo.comm.protocol import chunk_numel
    from dilo.comm.torch_dist import TorchGroup, all_gather_single

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    results = []
    for numel in args.sizes:
        for name in args.codecs:
            torch.manual_seed(rank)
            pieces = 4
            model = torch.nn.Module()
            for i in range(pieces):
                n = numel // pieces + (numel % pieces if i == pieces - 1 else 0)
                model.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(n) * 0.02))
            noise = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            group = TorchGroup()
            if args.pieces is not None:  # comm.pieces (a checkout before it has no such attribute to read)
                group.pieces = args.pieces
            d = DiLoCo(model, opt, inner_steps=1, codec=name, group=group,
                       **({"digest": args.outer_digest} if args.outer_digest else {}))

            def move():
                with torch.no_grad():
                    for p, z in zip(model.parameters(), noise):
                        p.add_(z)

            move()
            d.step()  # warm-up: the momentum is created at the first outer step
            if args.outer_digest == "background":
                _wait_for_digest(d)
            steps, rss, cpu, digest_cpu, digest_wait = [], [], [], [], []
            prof = None
            if args.profile and rank == 0:
                import cProfile
                prof = cProfile.Profile(time.thread_time)  # CPU time: a rank descheduled by the others costs nothing
            for _ in range(args.repeats):
                move()
                dist.barrier()
                if rank == 0:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                    before = _status("VmRSS")
                t0, c0 = time.perf_counter(), time.thread_time()
                if prof is not None:
                    prof.enable()
                d.step()
                if prof is not None:
                    prof.disable()
                cpu.append(time.thread_time() - c0)
                steps.append(slowest(time.perf_counter() - t0))
                if args.outer_digest == "background":  # the state this step handed to the digest thread
                    digest_wait.append(_wait_for_digest(d))
                    digest_cpu.append(_digest_thread_cpu(d))
                if rank == 0:
                    rss.append((_status("VmHWM") - before) / (4 * numel))
            if prof is not None:
                import pstats
                print(f"--- rank 0, {name}, {numel} params, {args.repeats} steps", flush=True)
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                top = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:14]
                profile = [{"function": f"{Path(file).name}:{line}({fn})" if line else fn,
                            "calls_per_step": calls / args.repeats, "cpu_s_per_step": tt / args.repeats}
                           for (file, line, fn), (_, calls, tt, _, _) in top]
            # The floor: the same bytes, pre-encoded, through the same two collectives.
            codec = get_codec(name)
            chunk = chunk_numel(numel, args.ranks, codec.block_size)
            nbytes = codec.encoded_nbytes(chunk)
            send = torch.cat([codec.encode(torch.randn(chunk) * 1e-3) for _ in range(args.ranks)])
            recv = torch.empty_like(send)
            own = send[:nbytes].clone()
            gathered = torch.empty(nbytes * args.ranks, dtype=torch.uint8)
            floors = []
            for _ in range(args.repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(recv, send)
                all_gather_single(gathered, own)
                floors.append(slowest(time.perf_counter() - t0))
            floors = floors[1:]
            src, dst = torch.randn(numel), torch.empty(numel)
            copies = []
            for _ in range(args.repeats + 1):
                c0 = time.thread_time()
                dst.copy_(src)
                copies.append(time.thread_time() - c0)
            del src, dst
            if rank == 0:
                step, floor = statistics.median(steps), statistics.median(floors)
                row = {"numel": numel, "codec": name, "step_s": step, "floor_s": floor,
                       "ratio": step / floor, "steps_s": steps, "floors_s": floors,
                       "rss_copies": max(rss), "wire_bytes_per_rank": 2 * (args.ranks - 1) * nbytes,
                       # rank 0's main-thread CPU seconds of the step (the compute, not the waiting)
                       # and of one copy_ of the fp32 vector: the step's cost in memcpy passes
                       "cpu_s": statistics.median(cpu), "memcpy_cpu_s": statistics.median(copies[1:]),
                       "cpu_passes": statistics.median(cpu) / statistics.median(copies[1:])}
                if digest_cpu:  # outer.digest = background: the digest thread's CPU per step, and how long
                    # rank 0 waited for it after the step (the part the step's own time did not cover)
                    row.update(digest="background", digest_cpu_s=statistics.median(_per_step(digest_cpu)),
                               digest_wait_s=statistics.median(digest_wait))
                if prof is not None:  # each function's own CPU per step, also in memcpy passes
                    row["profile"] = [dict(p, passes=p["cpu_s_per_step"] / row["memcpy_cpu_s"]) for p in profile]
                print(json.dumps(row), flush=True)
                results.append(row)
            d.close()
            del d, model, opt, noise, send, recv, gathered, own
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _digest_times(sizes: list[int], repeats: int, repo: str) -> list[dict]:
    """Wall seconds (median) of hashing θ + momentum (2 × size fp32) per algorithm, in this process."""
    sys.path.insert(0, repo)
    import numpy as np
    import torch

    from dilo.comm.protocol import state_digest

    try:
        import blake3
    except ImportError:
        blake3 = None
    rows = []
    for numel in sizes:
        data = np.random.default_rng(0).standard_normal(2 * numel, dtype=np.float32)
        view = memoryview(data).cast("B")
        algos = {"sha256": lambda: hashlib.sha256(view).hexdigest()}
        if blake3 is not None:
            algos["blake3"] = lambda: blake3.blake3(view).hexdigest()
            algos["blake3_threads"] = lambda: blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
        # the run's own digest (dilo.comm.protocol.state_digest, θ and momentum as two tensors)
        # with torch at 1 and 2 threads: it hashes with torch's thread count, the same value
        halves = [torch.from_numpy(data[:numel]), torch.from_numpy(data[numel:])]
        for threads in (1, 2):
            algos[f"state_digest_{threads}t"] = lambda t=threads, h=halves: (torch.set_num_threads(t), state_digest(h, 1))
        algos["memcpy"] = lambda: np.copyto(out, data)
        out = np.empty_like(data)
        for name, fn in algos.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rows.append({"numel_hashed": 2 * numel, "algo": name, "seconds": statistics.median(times)})
            if name.startswith("state_digest"):
                rows[-1]["digest"] = fn()[1]
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot_labels(doc: dict, wanted: list[str] | None = None) -> list[str]:
    """The labels the picture draws: `wanted` (each must be in the file), else the first (the
    step before any pass) and the last two (the latest before/after pair): every label of a
    long history in one picture is unreadable; the JSON keeps them all."""
    labels = list(doc)
    if wanted:
        missing = [w for w in wanted if w not in doc]
        if missing:
            raise SystemExit(f"--plot-labels: {', '.join(missing)} not in the JSON (it has: {', '.join(labels)})")
        return wanted
    return labels if len(labels) <= 3 else [labels[0], *labels[-2:]]


def _plot(doc: dict, png: str, wanted: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    codecs = sorted({r["codec"] for label in doc for r in doc[label].get("rows", [])})
    # (the styles cycle: zip() with five of them drew only the file's first five labels)
    # (a marker per label too: a label measured at one size is a point, which has no line style)
    for label, style, marker in zip(plot_labels(doc, wanted), itertools.cycle(("--", ":", "-.", (0, (1, 3)), "-")),
                                    itertools.cycle("osD^vP")):
        rows = doc[label].get("rows", [])
        for codec in sorted({r["codec"] for r in rows}):  # one colour per codec in every label
            pts = sorted((r["numel"], r["ratio"]) for r in rows if r["codec"] == codec)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style, marker=marker,
                    color=f"C{codecs.index(codec)}", label=f"{codec} ({label})")
    ax.axhline(1.5, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("outer step ÷ data-movement floor")
    ax.set_title("DiLoCo.step() at a boundary, 4 gloo ranks on loopback (median)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def table(doc: dict) -> str:
    """Markdown rows: size, codec, each label's step s (÷ floor), speed-up first → last label,
    peak RSS growth per label, and the last label's step CPU in memcpy passes."""
    labels = list(doc)
    head = " | ".join(f"{label}: step s (÷ floor)" for label in labels)
    title = (f"| params | codec | {head} | speed-up | peak RSS growth {' → '.join(labels)} (fp32 copies) "
             f"| {labels[-1]}: step CPU ÷ memcpy |")
    lines = [title, "|---|---|" + "---|" * (len(labels) + 3)]
    rows = {}
    for label in labels:
        for r in doc[label].get("rows", []):
            rows.setdefault((r["numel"], r["codec"]), {})[label] = r
    for (numel, codec), by in sorted(rows.items()):
        got = [by.get(label) for label in labels]
        cells = " | ".join(f"{r['step_s']:.3f} ({r['ratio']:.1f}×)" if r else "—" for r in got)
        first, last = got[0], got[-1]
        speed = f"{first['step_s'] / last['step_s']:.1f}×" if first and last else "—"
        rss = " → ".join(f"{r['rss_copies']:.1f}" if r else "—" for r in got)
        passes = f"{last['cpu_passes']:.1f}" if last and "cpu_passes" in last else "—"
        lines.append(f"| {numel:.0e} | {codec} | {cells} | {speed} | {rss} | {passes} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(REPO), help="checkout whose dilo is measured")
    p.add_argument("--label", default="after", help="key under which the rows go into --out")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=[10**6, 10**7, 10**8])
    p.add_argument("--codecs", type=lambda s: s.split(","), default=["fp32", "bf16", "fp16", "int8", "fp4"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pieces", type=int, help="comm.pieces of the exchange (default: the checkout's default)")
    p.add_argument("--digest", action="store_true", help="also time sha256 vs blake3 over θ + momentum")
    p.add_argument("--outer-digest", choices=["step", "background"], default=None,
                   help="DiLoCo's outer.digest (default: the checkout's default); background also records the "
                        "digest thread's CPU per step (digest_cpu_s) and rank 0's wait for it after the step")
    p.add_argument("--profile", action="store_true", help="print rank 0's cProfile (main-thread CPU time) of the timed steps; "
                   "its top functions also go into the JSON row (`profile`)")
    p.add_argument("--out", default=None)
    p.add_argument("--png", default=None, help="picture of the --out JSON (with --table: of that JSON)")
    p.add_argument("--plot-labels", type=lambda s: s.split(","), default=None,
                   help="comma list of the labels the picture draws (default: the first and the last two)")
    p.add_argument("--table", metavar="JSON", help="print a markdown table of an earlier --out and exit")
    args = p.parse_args()
    if args.table:
        doc = json.loads(Path(args.table).read_text())
        print(table(doc))
        if args.png:
            _plot(doc, args.png, args.plot_labels)
        return
    args.repo = str(Path(args.repo).resolve())

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, port, queue)) for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        rows = queue.get()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    entry = {"command": " ".join(sys.argv), "repo": args.repo, "ranks": args.ranks,
             "repeats": args.repeats, "pieces": args.pieces, "outer_digest": args.outer_digest, "rows": rows,
             "note": "2-core machine shared with other jobs; ranks run one thread each"}
    if args.digest:
        entry["digest"] = _digest_times(args.sizes, args.repeats, args.repo)
    if args.out:
        doc = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        old = doc.get(args.label, {})
        keep = [r for r in old.get("rows", []) if (r["numel"], r["codec"]) not in {(x["numel"], x["codec"]) for x in rows}]
        entry["rows"] = sorted(keep + rows, key=lambda r: (r["numel"], r["codec"]))
        entry["commands"] = old.get("commands", []) + [entry.pop("command")]
        if "digest" not in entry and "digest" in old:
            entry["digest"] = old["digest"]
        doc[args.label] = entry
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        if args.png:
            _plot(doc, args.png, args.plot_labels)


if __name__ == "__main__":
    main()
