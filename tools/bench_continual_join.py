"""A peer joins a never-ending swarm run mid-stream, on a watched folder (docs/continual.md).

    flock /work/lead/heavy.lock python tools/bench_continual_join.py \\
        --out docs/results/continual_join.json

Peers a and b start an endless run (run.steps 0, comm.backend hivemind) on a watched folder
holding one shard; after --rounds-before rounds a second shard is renamed in and taken;
then peer c starts and joins (it downloads θ, the momentum and the consumed-data manifest
from a donor); after --rounds-joined rounds of all three a third shard arrives, which c
must agree on with the others; after --rounds-after more rounds every peer gets SIGTERM and
stops at its next outer step. The JSON says, per peer, where it joined and stopped, at which
outer step each shard was taken, whether every outer step's global hash is the same on every
peer that ran it, and whether the versions the three published at one step after the join
hold the same hash and the same manifest (cursor, position, repeat pass, steps, shards).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.report import ToolError, document, run_tool, write_json  # noqa: E402
from tools.runs import REPO, child_env, kill_tree, records, tail  # noqa: E402

PEER = ["--config", "configs/tiny.toml", "--model.d_model", "32", "--model.n_layers", "1",
        "--model.n_heads", "2", "--model.seq_len", "32", "--data.batch_size", "4",
        "--data.eval_batches", "2", "--inner.warmup_steps", "5", "--metrics.progress", "off",
        "--run.threads", "1", "--comm.backend", "hivemind", "--peers.listen", "/ip4/127.0.0.1/tcp/0",
        "--outer.inner_steps", "5", "--comm.timeout", "60", "--peers.heartbeat", "1",
        "--peers.linger", "5", "--peers.min_peers", "2", "--peers.num_shards", "2", "--run.steps", "0",
        "--data.watch", "true", "--data.val_fraction", "0", "--data.when_idle", "repeat",
        "--data.replay", "0.25", "--publish.every", "2", "--publish.keep", "100000"]
SLOT_FIELDS = ("shard", "batch_index")
"""Manifest fields that belong to a peer's data slot, not to the swarm."""
TAKEN = re.compile(r"data: shard (\d+) taken: (\S+) .* after (\d+) steps")


def scenario(work: Path, shard_bytes: int = 4000, rounds_before: int = 2, rounds_joined: int = 3,
             rounds_after: int = 3, timeout_s: float = 240.0) -> dict:
    """Run the three peers in `work` (it must not exist); returns the results dict."""
    data = work / "data"
    data.mkdir(parents=True)
    text = "".join(p.read_text() for p in sorted((REPO / "dilo").glob("*.py")))
    shards = [text[i * shard_bytes:(i + 1) * shard_bytes] for i in range(3)]
    (data / "shard-0.txt").write_text(shards[0])
    key = work / "run.key"
    key.write_text("bench-continual-join-key-0123")
    procs: dict[str, subprocess.Popen] = {}
    deadline = time.monotonic() + timeout_s

    def log(name: str) -> str:
        return tail(work / f"{name}.log", 10**7)

    def wait_for(predicate, what: str) -> None:
        while not predicate():
            for name, p in procs.items():
                if p.poll() is not None:
                    raise ToolError(f"peer {name} exited ({p.returncode}) while waiting for {what}:\n" +
                                    tail(work / f"{name}.log"))
            if time.monotonic() > deadline:
                raise ToolError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def start(name: str, donor: str | None = None) -> None:
        extra = []
        if donor is not None:
            address = work / donor / "address.txt"
            wait_for(lambda: address.exists() and address.read_text().split(), f"{donor}'s address")
            extra = ["--peers.initial", address.read_text().split()[0]]
        cmd = [sys.executable, "-m", "dilo.train", *PEER, "--peers.key_file", str(key), "--data.path",
               str(data), "--run.dir", str(work / name), *extra]
        with open(work / f"{name}.log", "wb") as f:
            procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                                           cwd=REPO, start_new_session=True)

    def arrive(i: int) -> None:
        (data / f".shard-{i}.tmp").write_text(shards[i])
        (data / f".shard-{i}.tmp").rename(data / f"shard-{i}.txt")  # whole, or not at all

    def rounds(name: str, peers: int = 1) -> int:
        return sum(r["peers"] >= peers for r in records(work / name, "sync"))

    try:
        start("a")
        start("b", "a")
        wait_for(lambda: rounds("a") >= rounds_before, f"{rounds_before} rounds of a and b")
        arrive(1)
        wait_for(lambda: "taken: shard-1.txt" in log("a"), "shard-1 taken")
        start("c", "a")
        wait_for(lambda: rounds("c", 3) >= rounds_joined, f"{rounds_joined} rounds of all three")
        arrive(2)
        wait_for(lambda: all("taken: shard-2.txt" in log(n) for n in "abc"), "shard-2 taken by all three")
        marks = {n: rounds(n) for n in "abc"}
        wait_for(lambda: all(rounds(n) >= marks[n] + rounds_after for n in "abc"), f"{rounds_after} more rounds")
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in procs.items():
            try:
                codes[name] = p.wait(timeout=max(10.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ToolError(f"peer {name} did not stop after SIGTERM:\n" + tail(work / f"{name}.log")) from None
    finally:
        for p in procs.values():
            kill_tree(p)
    return results(work, codes)


def results(work: Path, codes: dict[str, int]) -> dict:
    by_step: dict[int, set[str]] = {}
    peers = {}
    for name in codes:
        run = work / name
        syncs = records(run, "sync")
        for r in syncs:
            by_step.setdefault(r["outer_step"], set()).add(r["global_hash"])
        joined = [r for r in records(run, "event") if r.get("event") == "swarm"]
        summary = [json.loads(p.read_text()) for p in run.glob("summary-*.json")]
        text = tail(work / f"{name}.log", 10**7)
        text = text.split("joined the swarm", 1)[-1]  # a joiner's own start-up takes are replaced
        taken = {m.group(2): int(m.group(3)) // 5 for m in TAKEN.finditer(text)}
        peers[name] = {"exit": codes[name], "joined_at": joined[0]["outer_step"] if joined and joined[0]["joined"] else None,
                       "download": joined[0].get("download") if joined else None,
                       "stopped_at": summary[0]["outer_steps"] if summary else None,
                       "rounds_with_3_peers": sum(r["peers"] == 3 for r in syncs),
                       "taken_at_outer_step": taken}
    published = [{p.name for p in (work / n / "published").glob("step-*")} for n in codes]
    common = sorted(set.intersection(*published))
    step = common[-1] if common else None
    docs = [json.loads((work / n / "published" / step / "manifest.json").read_text()) for n in codes] if step else []
    manifests = [{k: v for k, v in d["data"].items() if k not in SLOT_FIELDS} for d in docs]
    return {
        "peers": peers,
        "outer_steps_compared": len(by_step),
        "every_step_hash_agrees": all(len(h) == 1 for h in by_step.values()),
        "compared_version": step,
        "version_hashes_agree": len({d["global_hash"] for d in docs}) == 1 if docs else False,
        "manifests_agree": bool(manifests) and all(m == manifests[0] for m in manifests),
        "manifest": manifests[0] if manifests else None,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/results/continual_join.json")
    ap.add_argument("--work", default="", help="folder for the runs (default: a fresh temporary one)")
    ap.add_argument("--shard-bytes", type=int, default=4000)
    ap.add_argument("--rounds-before", type=int, default=3)
    ap.add_argument("--rounds-joined", type=int, default=5)
    ap.add_argument("--rounds-after", type=int, default=5)
    args = ap.parse_args(argv)
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="continual-join-")) / "w"
    res = scenario(work, args.shard_bytes, args.rounds_before, args.rounds_joined, args.rounds_after)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"peer_args": PEER}
    print(json.dumps({k: v for k, v in res.items() if k != "manifest"}, indent=1))
    write_json(args.out, document("bench_continual_join", settings, res))
    return 0 if res["every_step_hash_agrees"] and res["manifests_agree"] and res["version_hashes_agree"] else 1


if __name__ == "__main__":
    sys.exit(run_tool(main))
