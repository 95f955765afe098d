"""The hivemind backend, measured: joins, state downloads, rounds, and a peer dying mid-round.

    python tools/bench_swarm.py download --params 1000000 --repeats 3 --out runs/bench/swarm_download_1M.json
    python tools/bench_swarm.py download --params 100000000 --repeats 3 --out runs/bench/swarm_download_100M.json
    python tools/bench_swarm.py rounds --out runs/bench/swarm_rounds.json
    python tools/bench_swarm.py overlap --repeats 3 --out runs/bench/swarm_overlap.json

`download`: a donor process holds a global state of P parameters + P momentum values
(8P bytes, at outer step 1); a joiner process joins the swarm `--repeats` times through
the product's path (SwarmGroup start: libp2p daemon, DHT bootstrap, hello; bind: records,
download, checksum and majority checks). Reported: join seconds (SwarmGroup() + bind()),
download seconds and MB/s (the transfer and its checksum), medians over repeats.

`rounds`: real `dilo train` runs of the same small model on loopback (MODEL below, H=10,
15 outer steps, 3 workers): torchrun (torch backend) and three swarms (no fault; one peer SIGKILLed in
phase 1, and in phase 2, of round 4). Reported: the median sync seconds per round of each
backend (the whole outer step as the trainer logs it, waiting for the slowest worker
included), and for the kills, per survivor, the seconds spent on the round with the kill and
the next one, minus two median rounds.

`overlap`: the same three-peer swarm with blocking outer steps (overlap none) and with
`outer.overlap delayed` and `eager` (all with outer momentum 0, so only the overlap
differs), `--repeats` times each, variants interleaved. Reported per variant, medians over
repeats: the fraction of sync time hidden behind compute (sum of `seconds_hidden` over all
sync lines of all peers / sum of `seconds`), a peer's exposed sync seconds in the run, its
training-loop seconds and their ratio to overlap none, its compute utilization
(compute / loop seconds), and whether every peer of every run ended with the same hash.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KEY = "bench-swarm-run-key-0123456789"


# -- download -----------------------------------------------------------------------------
class _FakeState:
    """A SharedState without a model: P parameters and P momentum values at outer step 1."""

    round_lag = 0  # no overlapped outer steps

    def __init__(self, numel: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.outer_step = 1 if seed == 0 else 0
        self.tensors = {"params": torch.randn(numel, generator=g), "momentum": torch.randn(numel, generator=g)}

    def export_state(self):
        from dilo.comm.protocol import GlobalState

        return GlobalState(self.outer_step, {k: v.clone() for k, v in self.tensors.items()})


def _swarm(initial: list[str], timeout: float = 300.0):
    from dilo.comm.swarm import SwarmGroup
    from dilo.comm.swarm_auth import RunAuth

    return SwarmGroup(auth=RunAuth(KEY.encode()), settings={"bench": 1}, initial=initial,
                      listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=timeout, heartbeat=1.0)


def _donor(numel: int, address_file: str, stop_file: str) -> None:
    group = _swarm([])
    group.bind(_FakeState(numel, seed=0))
    Path(address_file).write_text(group.addresses[0])
    while not Path(stop_file).exists():
        time.sleep(0.2)
    group.close()


def _joiner(numel: int, address: str, repeats: int) -> list[dict]:
    import torch

    want = _FakeState(numel, seed=0).tensors
    out = []
    for _ in range(repeats):
        own = _FakeState(numel, seed=1)  # the joiner's model exists before it joins
        start = time.perf_counter()
        group = _swarm([address])
        state = group.bind(own)
        join_s = time.perf_counter() - start
        info = dict(group.describe()["download"])
        assert state is not None and all(torch.equal(state.tensors[k], want[k]) for k in want)
        group.close()
        del state, own
        out.append({"join_seconds": join_s, "download_seconds": info["seconds"], "bytes": info["bytes"],
                    "download_mb_per_s": info["bytes"] / 1e6 / info["seconds"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def bench_download(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        address_file, stop_file = f"{tmp}/address", f"{tmp}/stop"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        donor = subprocess.Popen([sys.executable, __file__, "_donor", str(args.params), address_file, stop_file],
                                 env=env)
        try:
            deadline = time.time() + 300
            while not Path(address_file).exists():
                if donor.poll() is not None or time.time() > deadline:
                    raise SystemExit("the donor did not start")
                time.sleep(0.2)
            runs = _joiner(args.params, Path(address_file).read_text(), args.repeats)
        finally:
            Path(stop_file).write_text("")
            donor.wait(timeout=60)
    return {"params": args.params, "state_bytes": 8 * args.params, "repeats": runs,
            **{f"median_{k}": statistics.median(r[k] for r in runs)
               for k in ("join_seconds", "download_seconds", "download_mb_per_s")}}


# -- rounds -------------------------------------------------------------------------------
# A small model, so that rounds, not inner steps, dominate on a shared 2-core machine.
MODEL = ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.seq_len", "64",
         "--data.batch_size", "8", "--data.max_bytes", "1000000"]
COMMON = ["--config", str(REPO / "configs" / "tiny.toml"), *MODEL, "--run.steps", "150", "--outer.inner_steps", "10",
          "--inner.warmup_steps", "10", "--data.eval_batches", "2", "--metrics.progress", "off", "--run.threads", "1"]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DILO_RUN_KEY=KEY, **(extra or {}))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _syncs(run_dir: Path) -> dict[int, float]:
    """Seconds of each outer step's sync by the step it reached (a round this peer lost and
    then downloaded counts under the step it downloaded)."""
    out = {}
    for path in run_dir.glob("metrics-*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "sync":
                out[r["outer_step"]] = out.get(r["outer_step"], 0.0) + r["seconds"]
    return out


def _torch_run(tmp: Path) -> list[float]:
    run = tmp / "torch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", "29517",
           "-m", "dilo.train", *COMMON, "--run.dir", str(run)]
    subprocess.run(cmd, env=_env(), cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=900)
    return [s for w in range(3) for s in _syncs_file(run / f"metrics-{w}.jsonl")]


def _syncs_file(path: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in path.read_text().splitlines()
            if json.loads(line)["kind"] == "sync"]


def _swarm_run(tmp: Path, name: str, fault: str = "", extra: tuple[str, ...] = ()) -> list[dict[int, float]]:
    base = [*COMMON, "--comm.backend", "hivemind", "--peers.listen", "/ip4/127.0.0.1/tcp/0",
            "--peers.min_peers", "3", "--peers.heartbeat", "1", "--comm.timeout", "120", *extra]
    dirs = [tmp / f"{name}-{p}" for p in "abc"]
    procs = [subprocess.Popen([sys.executable, "-m", "dilo.train", *base, "--run.dir", str(dirs[0])],
                              env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        address_file = dirs[0] / "address.txt"
        deadline = time.time() + 300
        while not (address_file.exists() and address_file.read_text().strip()):
            assert time.time() < deadline and procs[0].poll() is None, "first peer did not start"
            time.sleep(0.2)
        initial = address_file.read_text().split()[0]
        for i, d in enumerate(dirs[1:], start=1):  # the third peer crashes mid-round with a fault
            entry = ["-m", "tools.swarm_fault_peer", "--kill-at", fault] if fault and i == 2 else ["-m", "dilo.train"]
            procs.append(subprocess.Popen([sys.executable, *entry, *base, "--run.dir", str(d),
                                           "--peers.initial", initial], env=_env(), cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    survivors = dirs[:2] if fault else dirs
    return [_syncs(d) for d in survivors]


def bench_rounds(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        result = {"model": " ".join(MODEL), "workers": 3, "inner_steps": 10, "outer_steps": 15}
        torch_syncs = _torch_run(tmp)
        result["torch_median_sync_seconds"] = statistics.median(torch_syncs)
        clean = _swarm_run(tmp, "clean")
        result["swarm_median_sync_seconds"] = statistics.median(s for peer in clean for s in peer.values())
        result["swarm_over_torch"] = result["swarm_median_sync_seconds"] / result["torch_median_sync_seconds"]
        for phase in (1, 2):
            survivors = _swarm_run(tmp, f"kill{phase}", fault=f"4:{phase}")
            rows = []
            for peer in survivors:
                # The kill is in round 4 (-> outer step 5). A survivor that lost the round
                # downloads its result (that sync is not in `peer`: adopted), and the one that
                # completed it may wait for the other in round 5 (-> step 6): both rounds count.
                median = statistics.median(v for k, v in peer.items() if k not in (5, 6))
                spent = sum(peer.get(k, 0.0) for k in (5, 6))
                rows.append({"median_round_seconds": median, "rounds_5_6_seconds": spent,
                             "seconds_lost": spent - 2 * median})
            result[f"kill_phase{phase}_survivors"] = rows
    return result


OVERLAPS = {"none": (), "delayed": ("--outer.overlap", "delayed"), "eager": ("--outer.overlap", "eager")}


def _overlap_run(tmp: Path, name: str, flags: tuple[str, ...]) -> dict:
    _swarm_run(tmp, name, extra=("--outer.momentum", "0", "--outer.nesterov", "false", *flags))
    lines, summaries = [], []
    for peer in "abc":
        run_dir = tmp / f"{name}-{peer}"
        for path in run_dir.glob("metrics-*.jsonl"):
            lines += [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "sync"]
        summaries += [json.loads(path.read_text()) for path in run_dir.glob("summary-*.json")]
    return {"hidden_fraction": sum(r["seconds_hidden"] for r in lines) / sum(r["seconds"] for r in lines),
            "exposed_seconds": statistics.median(s["sync_seconds_exposed"] for s in summaries),
            "loop_seconds": statistics.median(s["loop_seconds"] for s in summaries),
            "utilization": statistics.median(s["compute_seconds"] / s["loop_seconds"] for s in summaries),
            "peers_finished": len(summaries), "same_final_hash": len({s["global_hash"] for s in summaries}) == 1}


def bench_overlap(args) -> dict:
    result = {"model": " ".join(MODEL), "workers": 3, "inner_steps": 10, "outer_momentum": 0.0,
              "repeats": args.repeats, "runs": {name: [] for name in OVERLAPS}}
    with tempfile.TemporaryDirectory() as tmp_name:
        for i in range(args.repeats):
            for name, flags in OVERLAPS.items():
                result["runs"][name].append(_overlap_run(Path(tmp_name), f"{name}{i}", flags))
    variants = {}
    for name, runs in result["runs"].items():
        variants[name] = {k: statistics.median(r[k] for r in runs)
                          for k in ("hidden_fraction", "exposed_seconds", "loop_seconds", "utilization")}
        variants[name]["same_final_hash"] = all(r["same_final_hash"] and r["peers_finished"] == 3 for r in runs)
    for v in variants.values():
        v["loop_over_none"] = v["loop_seconds"] / variants["none"]["loop_seconds"]
    result["variants"] = variants
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_donor":
        _donor(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("download")
    d.add_argument("--params", type=int, default=1_000_000)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--out", required=True)
    r = sub.add_parser("rounds")
    r.add_argument("--out", required=True)
    o = sub.add_parser("overlap")
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"download": bench_download, "rounds": bench_rounds, "overlap": bench_overlap}[args.what](args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("repeats", "runs")}, indent=2))


if __name__ == "__main__":
    main()
