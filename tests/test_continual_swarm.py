"""data.watch on the swarm backend (docs/continual.md): shards agreed through the rounds, and a
peer that joins mid-stream continues at the manifest it downloads with the state."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dilo.comm.swarm_round import agree_offers
from tests.helpers import SMALL, summaries

KEY = "test-run-key-0123456789"


def test_the_leader_answers_the_files_every_member_offered_past_the_newest_last():
    offers = [{"last": "a", "files": [["b", 5], ["c", 7], ["d", 1]]},
              {"last": "a", "files": [["b", 5], ["c", 8], ["d", 1], ["e", 2]]},
              {"last": "b", "files": [["c", 7], ["d", 1]]}]
    assert agree_offers(offers) == [["d", 1]]  # c differs in size, b is taken already, e unseen
    assert agree_offers(offers[:2]) == [["b", 5], ["d", 1]]
    assert agree_offers([offers[0], None]) is None  # a run without data.watch offers nothing


def _records(run_dir: Path, kind: str) -> list[dict]:
    out = []
    for path in run_dir.glob("metrics-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if record["kind"] == kind:
                out.append(record)
    return out


def _wait_for(predicate, timeout: float, what: str, procs) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"a peer exited (rc {p.returncode}) while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.e2e
def test_an_endless_swarm_peer_joining_mid_stream_agrees_on_hash_and_manifest(procs, tmp_path):
    """a and b train without end (run.steps 0) on a watched folder; a new shard arrives and is
    taken; then c joins, downloading the state with its manifest. Every outer step's hash is
    the same on every peer, and the versions all three published at one step after the join
    hold the same hash and the same consumed-data manifest. SIGTERM stops them."""
    data = tmp_path / "data"
    data.mkdir()
    src = (Path(__file__).parent / "test_continual.py").read_text()
    (data / "a.txt").write_text(src[:4000])
    key = tmp_path / "run.key"
    key.write_text(KEY)
    args = [*SMALL, "--comm.backend", "hivemind", "--peers.listen", "/ip4/127.0.0.1/tcp/0",
            "--outer.inner_steps", "5", "--comm.timeout", "60", "--peers.heartbeat", "1",
            "--peers.linger", "5", "--peers.key_file", str(key), "--peers.min_peers", "2",
            "--peers.num_shards", "2", "--run.steps", "0", "--data.watch", "true",
            "--data.path", str(data), "--data.val_fraction", "0", "--data.when_idle", "repeat",
            "--data.replay", "0.25", "--publish.every", "2", "--publish.keep", "100000"]
    tag = {"DILO_TEST_TAG": os.urandom(8).hex()}

    def start(name: str, initial: Path | None = None):
        extra = []
        if initial is not None:
            address = initial / "address.txt"
            _wait_for(lambda: address.exists() and address.read_text().split(), 120, str(address), [])
            extra = ["--peers.initial", address.read_text().split()[0]]
        cmd = [sys.executable, "-m", "dilo.train", *args, "--run.dir", str(tmp_path / name), *extra]
        return procs.start(cmd, tmp_path / f"{name}.log", env=tag), tmp_path / name

    a, a_dir = start("a")
    b, b_dir = start("b", a_dir)
    _wait_for(lambda: len(_records(a_dir, "sync")) >= 2, 180, "two rounds of a and b", [a, b])
    (data / ".b.tmp").write_text(src[4000:9000])
    (data / ".b.tmp").rename(data / "b.txt")  # a new shard arrives mid-stream
    _wait_for(lambda: "shard 1 taken: b.txt" in (tmp_path / "a.log").read_text(), 120, "b.txt taken", [a, b])
    c, c_dir = start("c", a_dir)  # joins after b.txt was agreed on
    _wait_for(lambda: sum(r["peers"] == 3 for r in _records(c_dir, "sync")) >= 4, 180,
              "four rounds of all three peers", [a, b, c])
    for p in (a, b, c):
        p.send_signal(signal.SIGTERM)
    for name, p in (("a", a), ("b", b), ("c", c)):
        assert p.wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    by_step: dict[int, set[str]] = {}
    for d in (a_dir, b_dir, c_dir):
        for r in _records(d, "sync"):
            by_step.setdefault(r["outer_step"], set()).add(r["global_hash"])
    assert all(len(h) == 1 for h in by_step.values()), by_step
    joined = [r for r in _records(c_dir, "event") if r.get("event") == "swarm"][0]
    assert joined["joined"] and joined["outer_step"] >= 3  # after b.txt was taken
    published = [{p.name for p in (d / "published").glob("step-*")} for d in (a_dir, b_dir, c_dir)]
    step = max(set.intersection(*published))
    docs = [json.loads((d / "published" / step / "manifest.json").read_text()) for d in (a_dir, b_dir, c_dir)]
    assert int(step.split("-")[1]) > joined["outer_step"] and len({m["global_hash"] for m in docs}) == 1
    strip = ("shard", "batch_index")
    manifests = [{k: v for k, v in m["data"].items() if k not in strip} for m in docs]
    assert manifests[1] == manifests[0] and manifests[2] == manifests[0]
    assert [s["name"] for s in manifests[0]["shards"]] == ["a.txt", "b.txt"]
    assert manifests[0]["steps"] == 5 * int(step.split("-")[1])
