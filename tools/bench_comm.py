"""One outer exchange, measured: bytes on the wire and seconds, per codec, backend and link.

    python tools/bench_comm.py --quick --out runs/bench/comm.json
    python tools/bench_comm.py --workers 4 --rates loopback,1gbit,100mbit,20mbit --out comm.json
    python tools/bench_comm.py --params 10000000 --codecs int8,fp4 --rates 1gbit --pieces 1,4 --out comm.json

For each link setting the tool builds a simulated network (tools/netsim.py: `loopback`
= all workers in one namespace on an unlimited loopback; a rate = one namespace per
worker, each with its own link of that rate), starts one worker process per member and
has them run, per codec, `--repeats` timed outer exchanges of a P-element fp32 vector
through the backend's dilo `Group.average` (the product's code path: the two-phase
exchange; with `--pieces 1,4` each codec once per `comm.pieces` value, the values
interleaved repeat by repeat). Reported per codec (and pieces), against theory:

- bytes: the payload dilo puts on the wire (`ExchangeResult.bytes_sent`), the bytes the
  interface counted (TCP/IP headers, gloo framing and ACKs included; a barrier's own
  traffic subtracted), both as ratios to the two-phase minimum 2(N-1)·E(⌈P/N⌉), where E
  is the codec's encoded size;
- seconds: the slowest member's exchange time, median and spread over repeats, as a
  ratio to minimum bytes / rate (each worker's link carries its 2(N-1)·E(⌈P/N⌉) bytes out
  and as many in, at `rate` per direction);
- the joiner's download of the global state (θ + outer momentum, 8P bytes): for the
  torch backend a broadcast from member 0 to member N-1 (a two-member group);
- a `raw_tcp` row, the link's reference in the same run (tools/tcp_reference.py): plain
  TCP sockets, every member sending the fp32 exchange's minimum bytes to its peers all
  at once. `seconds_over_raw_tcp` = an exchange's time ÷ the raw time scaled to the same
  bytes: the backend's own cost, separated from the link's.

Backends live in tools/comm_backends.py: a `CommBackend` subclass registered in
`BACKENDS` connects the members, exposes a dilo `Group`, a barrier and the state
download. `torch` (torch.distributed/gloo) is there; the hivemind backend is built
elsewhere and is added by writing its `CommBackend` (its download is the real joiner
path) and registering it; `--backends torch,hivemind` then measures both in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dilo.codecs import CODEC_NAMES, get_codec  # noqa: E402
from dilo.options import EXCHANGE_PIECES, check_pieces  # noqa: E402
from tools import netsim  # noqa: E402
from tools.report import (ToolError, describe, document, png_path, require_matplotlib,  # noqa: E402
                          run_tool, write_json)
from tools.runs import REPO, child_env, tail, wait_all  # noqa: E402
from tools.comm_backends import BACKENDS  # noqa: E402
from tools.tcp_reference import TcpMesh  # noqa: E402

PORT = 29511  # inside private namespaces: no collision with anything else on the machine


# -- theory --------------------------------------------------------------------------------
def sparse_bytes(numel: int, density: float = 0.02, value_bits: int = 2, block: int = 4096) -> int:
    """The sparse codec's size: per block of r elements, k' = min(k, r) entries, a bitmap of
    k' + ((r - 1) >> l) + 1 bits, k' x (l + value_bits) bits, whole bytes; two fp32 (docs/codecs.md)."""
    k = max(1, min(block, math.floor(density * block + 0.5)))
    low = (block // k).bit_length() - 1
    total = 0
    for r in [block] * (numel // block) + ([numel % block] if numel % block else []):
        kept = min(k, r)
        total += -(-(kept + ((r - 1) >> low) + 1 + kept * (low + value_bits)) // 8) + 8
    return total


def encoded_bytes(codec: str, numel: int, block_size: int) -> int:
    """Bytes of `numel` elements in a codec's wire format (from the format, not the code);
    sparse with its defaults (density 0.02, 2-bit values, blocks of 4096)."""
    if codec == "sparse":
        return sparse_bytes(numel)
    blocks = -(-numel // block_size)
    return {"fp32": 4 * numel, "bf16": 2 * numel, "fp16": 2 * numel, "int8": numel + 4 * blocks,
            "fp4": -(-numel // 2) + 4 * blocks, "int2": -(-numel // 4) + 4 * blocks}[codec]


def exchange_min_bytes(codec: str, numel: int, members: int, block_size: int) -> int:
    """Two-phase minimum per member: N-1 encoded chunks out in the reduce-scatter, its own
    averaged chunk to N-1 members in the all-gather; chunks of ⌈P/N⌉ elements. sparse is
    all-gathered whole: its encoding of all P elements to N-1 members."""
    if codec == "sparse":
        return (members - 1) * encoded_bytes(codec, numel, block_size)
    return 2 * (members - 1) * encoded_bytes(codec, -(-numel // members), block_size)


def exchange_payload_bytes(codec: str, numel: int, members: int, block_size: int) -> int:
    """What dilo sends per member: as the minimum, but chunks are whole codec blocks."""
    if codec == "sparse":
        return exchange_min_bytes(codec, numel, members, block_size)
    block = block_size if codec in ("int8", "fp4", "int2") else 1
    chunk = max(block, -(-(-(-numel // members)) // block) * block)
    return 2 * (members - 1) * encoded_bytes(codec, chunk, block_size)


def ideal_seconds(nbytes: float, rate_bps: int | None) -> float | None:
    return None if rate_bps is None else nbytes * 8 / rate_bps


# -- one worker (a subprocess inside a namespace) ------------------------------------------
def read_counters(iface: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    backend = BACKENDS[args.backend](args.rank, args.world, args.addr, args.port, args.timeout)
    flat = torch.randn(args.params, generator=torch.Generator().manual_seed(args.rank)) * 1e-3
    out: dict = {"rank": args.rank, "exchanges": {}, "barrier": [], "download": [], "raw_tcp": []}
    mesh = TcpMesh(args.rank, args.addrs.split(","), args.port + 100, args.timeout)
    backend.barrier()  # everyone listens before anyone connects
    mesh.connect()

    def measured(fn) -> dict:
        backend.barrier()
        tx0, rx0 = read_counters(args.iface)
        backend.barrier()  # nobody sends before every member has read its counters
        start = time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - start
        backend.barrier()
        tx1, rx1 = read_counters(args.iface)
        return {"seconds": seconds, "wire_tx": tx1 - tx0, "wire_rx": rx1 - rx0, **extra}

    for _ in range(args.repeats):
        out["barrier"].append(measured(lambda: None))
    pieces = [int(k) for k in str(args.pieces).split(",")]
    for name in args.codecs.split(","):
        codec = get_codec(name, args.block_size)
        for k in pieces:
            backend.group.pieces = k
            backend.group.average(flat, codec)  # warm-up: connections, allocations
            out["exchanges"][f"{name}@{k}"] = []
        for _ in range(args.repeats):  # the pieces values interleaved: the same machine load for each
            for k in pieces:
                backend.group.pieces = k

                def exchange() -> dict:
                    res = backend.group.average(flat, codec)
                    return {"bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received}
                out["exchanges"][f"{name}@{k}"].append(measured(exchange))
    per_peer = exchange_min_bytes("fp32", args.params, args.world, args.block_size) // (args.world - 1)
    mesh.exchange(per_peer)  # warm-up: TCP windows
    for _ in range(args.repeats):
        out["raw_tcp"].append(measured(lambda: mesh.exchange(per_peer)))
    mesh.close()
    state = torch.zeros(2 * args.params) if args.rank else torch.ones(2 * args.params)
    for _ in range(args.repeats):
        out["download"].append(measured(lambda: backend.download(state, 0, args.world - 1)))
    if args.rank == args.world - 1 and not bool((state == 1).all()):
        raise RuntimeError("the joiner's downloaded state differs from member 0's")
    backend.close()
    Path(args.result).write_text(json.dumps(out))
    return 0


# -- the driver ----------------------------------------------------------------------------
def measure_link(rate: str, args: argparse.Namespace, backend: str, tmp: Path) -> list[dict]:
    """Run the workers in a fresh simulated network; return their result documents."""
    rate_bps = netsim.parse_rate(rate)
    hosts = 1 if rate_bps is None else args.workers
    with netsim.NetSim(hosts=hosts, rate=rate_bps) as net:
        procs, logs, results = [], [], []
        for rank in range(args.workers):
            host = 0 if hosts == 1 else rank
            results.append(tmp / f"{backend}-{rate}-{rank}.json")
            logs.append(tmp / f"{backend}-{rate}-{rank}.log")
            cmd = [sys.executable, "-m", "tools.bench_comm", "--worker", "--backend", backend,
                   "--rank", str(rank), "--world", str(args.workers), "--addr", net.address(0),
                   "--port", str(PORT), "--iface", net.interface(host), "--params", str(args.params),
                   "--addrs", ",".join(net.address(0 if hosts == 1 else r) for r in range(args.workers)),
                   "--codecs", ",".join(args.codecs), "--repeats", str(args.repeats),
                   "--pieces", ",".join(map(str, args.pieces)),
                   "--block-size", str(args.block_size), "--timeout", str(args.timeout),
                   "--result", str(results[-1])]
            with open(logs[-1], "wb") as f:
                procs.append(net.popen(host, cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO))
        wait_all(procs, args.timeout, f"bench_comm workers ({backend}, {rate})", logs)
    try:
        return [json.loads(p.read_text()) for p in results]
    except OSError as e:
        raise ToolError(f"a worker wrote no result ({e}); log:\n{tail(logs[0])}") from None


def summarize(rate: str, backend: str, workers: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per codec (and the download): medians over repeats of the slowest member, ratios."""
    rate_bps = netsim.parse_rate(rate)
    # One namespace (loopback): every member read the same lo counter, which holds all
    # members' traffic; else each member read its own eth0.
    shared = rate_bps is None
    n, reps = args.workers, args.repeats

    def wire_bytes(rank: int | None, key: str, runs_of) -> list[float]:
        """Per repeat: bytes of member `rank` (None: mean over members) minus a barrier's."""
        ranks = [0] if shared else ([rank] if rank is not None else range(n))
        barrier = describe([workers[k]["barrier"][r][key] for k in ranks for r in range(reps)])["median"]
        per_rep = [sum(runs_of(workers[k])[r][key] for k in ranks) / len(ranks) - barrier
                   for r in range(reps)]
        return [b / n for b in per_rep] if shared and rank is None else per_rep

    def timing(runs_of, minimum: int) -> dict:
        seconds = [max(runs_of(w)[r]["seconds"] for w in workers) for r in range(reps)]
        ideal = ideal_seconds(minimum, rate_bps)
        return {"seconds": describe(seconds), "ideal_seconds": ideal,
                "seconds_over_ideal": describe([s / ideal for s in seconds]) if ideal else None}

    base = {"backend": backend, "rate": rate, "rate_bps": rate_bps, "workers": n, "params": args.params}
    raw_min = exchange_min_bytes("fp32", args.params, n, args.block_size) // (n - 1) * (n - 1)
    raw_wire = describe(wire_bytes(None, "wire_tx", lambda w: w["raw_tcp"]))
    raw = {**base, "what": "raw_tcp", "codec": "fp32", "min_bytes": raw_min, "payload_bytes": raw_min,
           "wire_bytes": raw_wire, "payload_over_min": 1.0, "wire_over_min": raw_wire["median"] / raw_min,
           **timing(lambda w: w["raw_tcp"], raw_min)}
    raw_seconds_per_byte = raw["seconds"]["median"] / raw_min
    rows = []
    for codec, k in ((c, k) for c in args.codecs for k in args.pieces):
        minimum = exchange_min_bytes(codec, args.params, n, args.block_size)
        payload = exchange_payload_bytes(codec, args.params, n, args.block_size)
        key = f"{codec}@{k}"
        sent = {w["exchanges"][key][r]["bytes_sent"] for w in workers for r in range(reps)}
        if sent != {payload}:
            raise ToolError(f"{codec}, pieces {k}: dilo reported {sorted(sent)} bytes sent per member, the "
                            f"two-phase formula says {payload}; the exchange changed")
        wire = describe(wire_bytes(None, "wire_tx", lambda w: w["exchanges"][key]))
        rows.append({**base, "what": "exchange", "codec": codec, "pieces": k, "min_bytes": minimum,
                     "payload_bytes": payload, "wire_bytes": wire,
                     "payload_over_min": payload / minimum, "wire_over_min": wire["median"] / minimum,
                     **timing(lambda w: w["exchanges"][key], minimum)})
        rows[-1]["seconds_over_raw_tcp"] = rows[-1]["seconds"]["median"] / (raw_seconds_per_byte * minimum)
    # The download: member 0 -> member n-1 only. Shared lo: its total is the transfer.
    state_bytes = 8 * args.params
    joiner = None if shared else n - 1
    wire = wire_bytes(joiner, "wire_tx" if shared else "wire_rx", lambda w: w["download"])
    wire = describe([b * n for b in wire] if shared else wire)
    rows.append({**base, "what": "download", "codec": "fp32", "min_bytes": state_bytes,
                 "payload_bytes": state_bytes, "wire_bytes": wire, "payload_over_min": 1.0,
                 "wire_over_min": wire["median"] / state_bytes,
                 **timing(lambda w: w["download"], state_bytes)})
    rows.append(raw)
    return rows


def add_loopback_split(rows: list[dict]) -> None:
    """With a loopback run in the same invocation, split time into local work and link.

    The loopback time of a codec is what the exchange costs without a bandwidth limit
    (encode, decode, reduce, protocol round trips on this machine's CPUs); a limited
    link should add about bytes/rate on top. `seconds_over_loopback_plus_ideal` near 1
    means the link is used at its rate and the rest is local compute.
    """
    local = {(r["backend"], r["what"], r["codec"], r.get("pieces")): r["seconds"]["median"]
             for r in rows if r["rate_bps"] is None}
    for r in rows:
        base = local.get((r["backend"], r["what"], r["codec"], r.get("pieces")))
        if r["ideal_seconds"] and base is not None:
            r["loopback_seconds"] = base
            r["seconds_over_loopback_plus_ideal"] = r["seconds"]["median"] / (base + r["ideal_seconds"])


def plot(rows: list[dict], path: Path) -> None:
    plt = require_matplotlib()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    limited = [r for r in rows if r["ideal_seconds"]]
    markers = {"fp32": "o", "bf16": "s", "fp16": "D", "int8": "^", "fp4": "v", "int2": "<", "sparse": "x"}
    rates = sorted({r["rate"] for r in limited}, key=lambda x: netsim.parse_rate(x))
    for color, rate in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], rates):
        for r in (r for r in limited if r["rate"] == rate):
            marker = {"download": "*", "raw_tcp": "x"}.get(r["what"]) or markers.get(r["codec"], "o")
            a.scatter(r["ideal_seconds"], r["seconds"]["median"], color=color, marker=marker, s=40)
        a.scatter([], [], color=color, label=rate)
    for codec, m in markers.items():
        a.scatter([], [], color="gray", marker=m, label=codec)
    a.scatter([], [], color="gray", marker="*", label="download θ+v")
    a.scatter([], [], color="gray", marker="x", label="raw TCP (link reference)")
    if limited:
        lo = min(r["ideal_seconds"] for r in limited) / 2
        hi = max(r["ideal_seconds"] for r in limited) * 2
        a.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="= bytes/rate")
        a.plot([lo, hi], [1.2 * lo, 1.2 * hi], "k--", lw=0.8, label="1.2 × bytes/rate")
    a.set(xscale="log", yscale="log", xlabel="minimum bytes / rate (s)",
          ylabel="measured seconds (median)", title="exchange time vs bytes/rate")
    a.legend(fontsize=7, ncol=2)
    ex = [r for r in rows if r["what"] == "exchange"]
    names = [f"{r['codec']}" + (f" K={r['pieces']}" if "pieces" in r else "") + f" {r['rate']}" for r in ex]
    b.bar(range(len(ex)), [r["wire_over_min"] for r in ex], color="tab:blue", label="wire / minimum")
    b.scatter(range(len(ex)), [r["payload_over_min"] for r in ex], color="k", zorder=3,
              label="dilo payload / minimum")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xticks(range(len(ex)), names, fontsize=6, rotation=90)
    top = max([r["wire_over_min"] for r in ex] + [1.0])
    b.set(ylabel="bytes / two-phase minimum", title="bytes per worker per exchange",
          ylim=(0.95, top + 0.05))
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def redo(args: argparse.Namespace) -> int:
    """Derived fields and the picture again, from an earlier result (no measurement)."""
    try:
        doc = json.loads(Path(args.from_json).read_text())
        rows = doc["results"]
    except (OSError, ValueError, KeyError) as e:
        raise ToolError(f"--from-json {args.from_json}: not a bench_comm result ({e})") from None
    picture = png_path(args.from_json, args.png)
    if picture:
        require_matplotlib()
    add_loopback_split(rows)
    write_json(args.from_json, doc)
    if picture:
        plot(rows, picture)
    print(f"bench_comm: rewrote {args.from_json}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


def tiny_params() -> int:
    """Trainable parameters of configs/tiny.toml's model (what DiLoCo synchronizes)."""
    from dilo.config import parse_args
    from dilo.model import GPT

    cfg = parse_args(["--config", str(REPO / "configs" / "tiny.toml")])
    return GPT(cfg.model).num_params()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small: 200k params, 2 repeats, loopback and 100mbit, fp32/int8/fp4")
    p.add_argument("--params", type=int, help="P, elements of the vector (default: tiny.toml's model)")
    p.add_argument("--workers", type=int, default=4, help="members N (default 4)")
    p.add_argument("--codecs", help=f"comma list of {', '.join(CODEC_NAMES)} (default all)")
    p.add_argument("--backends", default="torch", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--rates", help="comma list: loopback and/or rates like 1gbit,100mbit,20mbit")
    p.add_argument("--repeats", type=int, help="timed exchanges per codec (default 5)")
    p.add_argument("--block-size", type=int, default=256, help="int8/fp4/int2 block size")
    p.add_argument("--pieces", default=str(EXCHANGE_PIECES),
                   help=f"comma list of comm.pieces values, each measured (default {EXCHANGE_PIECES})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per link setting")
    p.add_argument("--out", default="runs/bench/comm.json", help="JSON output")
    p.add_argument("--png", help="picture (default: --out with .png; '' for none)")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: recompute derived fields and the picture of an earlier --out")
    # worker mode (started by the driver inside a namespace)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, typ in (("rank", int), ("world", int), ("addr", str), ("port", int),
                      ("iface", str), ("result", str), ("backend", str), ("addrs", str)):
        p.add_argument(f"--{name}", type=typ, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.from_json:
        return args
    quick = args.quick
    args.params = args.params or (200_000 if quick else tiny_params())
    args.repeats = args.repeats or (2 if quick else 5)
    args.codecs = (args.codecs or ("fp32,int8,fp4" if quick else ",".join(CODEC_NAMES))).split(",")
    args.rates = (args.rates or ("loopback,100mbit" if quick else "loopback,1gbit,100mbit,20mbit")).split(",")
    args.backends = args.backends.split(",")
    try:
        args.pieces = [int(k) for k in args.pieces.split(",")]
        for k in args.pieces:
            check_pieces(k)
    except ValueError as e:
        raise ToolError(f"--pieces {args.pieces}: {e}") from None
    for c in args.codecs:
        if c not in CODEC_NAMES:
            raise ToolError(f"--codecs: unknown codec {c!r}; choose from {', '.join(CODEC_NAMES)}")
    for b in args.backends:
        if b not in BACKENDS:
            raise ToolError(f"--backends: unknown backend {b!r}; available: {', '.join(BACKENDS)}")
    for r in args.rates:
        netsim.parse_rate(r)  # ValueError names the bad rate
    if args.workers < 2:
        raise ToolError("--workers must be >= 2 (an exchange needs two members)")
    if args.params < args.workers or args.repeats < 1 or args.block_size < 1:
        raise ToolError("--params must be >= --workers, --repeats and --block-size >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.from_json:
        return redo(args)
    try:
        netsim.require_tools()
    except netsim.NetSimError as e:
        raise netsim.NetSimError(f"{e} (bench_comm counts wire bytes inside private "
                                 "namespaces, loopback included)") from None
    picture = png_path(args.out, args.png)
    if picture:
        require_matplotlib()  # fail now, not after minutes of measuring
    rows: list[dict] = []
    settings = {k: getattr(args, k) for k in ("params", "workers", "codecs", "backends", "rates",
                                              "repeats", "block_size", "pieces")}
    with tempfile.TemporaryDirectory(prefix="bench_comm-") as tmp:
        for backend in args.backends:
            for rate in args.rates:
                print(f"bench_comm: {backend} over {rate}: {args.workers} workers, "
                      f"{args.params} params, {len(args.codecs)} codecs x {args.repeats}",
                      file=sys.stderr, flush=True)
                workers = measure_link(rate, args, backend, Path(tmp))
                rows += summarize(rate, backend, workers, args)
                write_json(args.out, document("bench_comm", settings, rows))
    add_loopback_split(rows)
    write_json(args.out, document("bench_comm", settings, rows))
    for r in rows:
        ratio = r["seconds_over_ideal"]["median"] if r["seconds_over_ideal"] else math.nan
        print(f"{r['backend']:6} {r['rate']:9} {r['what']:8} {r['codec']:5} K={r.get('pieces', '-')!s:2} "
              f"min {r['min_bytes'] / 1e6:8.3f} MB  wire/min {r['wire_over_min']:.3f}  "
              f"{r['seconds']['median']:.3f} s  s/ideal {ratio:.2f}  "
              f"s/raw_tcp {r.get('seconds_over_raw_tcp', math.nan):.2f}  "
              f"s/(loopback+ideal) {r.get('seconds_over_loopback_plus_ideal', math.nan):.2f}")
    if picture:
        plot(rows, picture)
    print(f"bench_comm: wrote {args.out}" + (f" and {picture}" if picture else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, name="bench_comm"))
