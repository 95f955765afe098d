"""The hivemind backend with real processes on loopback: joins, a crash mid-exchange, refusals.

Every test checks that no p2pd daemon, reaper, socket file or /dev/shm file outlives it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

import hivemind  # noqa: E402,F401  (installed by the test extra)

from tools import proctree
from tools.runs import records
from tests.helpers import SMALL, summaries, torchrun_cmd  # noqa: E402

SWARM = [*SMALL, "--comm.backend", "hivemind", "--peers.listen", "/ip4/127.0.0.1/tcp/0",
         "--outer.inner_steps", "5", "--comm.timeout", "60", "--peers.heartbeat", "1",
         "--peers.linger", "30"]
KEY = "test-run-key-0123456789"


# -- helpers ------------------------------------------------------------------------------
def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"a peer exited (rc {p.returncode}) while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Swarm:
    def __init__(self, procs, tmp_path: Path, tag: str):
        self.procs, self.tmp, self.tag = procs, tmp_path, tag
        self.key_file = tmp_path / "run.key"
        self.key_file.write_text(KEY)

    def start(self, name: str, *extra: str, initial: Path | None = None, kill_at: str = ""):
        """`dilo train` as a swarm peer; with kill_at "ROUND:PHASE" it SIGKILLs itself in the middle
        of that exchange (tools/swarm_fault_peer.py)."""
        run_dir = self.tmp / name
        entry = ["-m", "tools.swarm_fault_peer", "--kill-at", kill_at] if kill_at else ["-m", "dilo.train"]
        args = [*entry, *SWARM, "--run.dir", str(run_dir), "--peers.key_file", str(self.key_file), *extra]
        if initial is not None:
            args += ["--peers.initial", self.address(initial)]
        return self.start_cmd(name, [sys.executable, *args]), run_dir

    def start_cmd(self, name: str, cmd: list[str], env: dict | None = None):
        # The tag is inherited by the peer's p2pd and reaper: no_leftovers finds them by it.
        return self.procs.start(cmd, self.tmp / f"{name}.log", env={"DILO_TEST_TAG": self.tag, **(env or {})})

    def address(self, run_dir: Path) -> str:
        path = run_dir / "address.txt"
        return wait_for(lambda: path.exists() and path.read_text().split(), 120, f"{path}")[0]

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()


def finish(proc, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        raise AssertionError(f"peer {proc.args} did not finish within {timeout} s") from None


def hashes_agree_per_step(run_dirs: list[Path]) -> int:
    """Every outer step's hash is the same on every peer that logged it; returns the steps seen."""
    by_step: dict[int, set[str]] = {}
    for run_dir in run_dirs:
        for r in records(run_dir, "sync"):
            by_step.setdefault(r["outer_step"], set()).add(r["global_hash"])
    diverged = {step: h for step, h in by_step.items() if len(h) != 1}
    assert not diverged, f"peers disagree at outer steps {sorted(diverged)}\n" + agreement_report(run_dirs)
    return len(by_step)


def agreement_report(run_dirs: list[Path], steps: int = 4) -> str:
    """For a failure message: each peer's final hash, the first outer steps at which the peers'
    hashes differ (which peer had which hash, with how many peers, adopted or not), and what
    each peer did besides exchanging (its join, adoptions, downloads, solo or failed rounds,
    fetched results), so that a rare divergence says where it began."""
    lines: list[str] = []
    by_step: dict[int, list[tuple[str, str, str]]] = {}  # step -> (peer, hash, how)
    for run_dir in run_dirs:
        finals = [f"{s['global_hash'][:12]} at outer step {s['outer_steps']}" for s in summaries(run_dir)]
        counts: dict[str, float] = {}
        for r in records(run_dir, "counter"):
            label = r["name"] + "".join(f"[{v}]" for v in r.get("labels", {}).values())
            counts[label] = counts.get(label, 0) + r["value"]
        joins = [(r.get("joined"), r.get("outer_step")) for r in records(run_dir, "event") if r.get("event") == "swarm"]
        lines.append(f"{run_dir.name}: final {', '.join(finals) or '(no summary)'}; "
                     f"swarm event (joined, outer step) {joins}; counters {counts}")
        for r in records(run_dir, "sync"):
            how = f"peers {r['peers']}, fragment {r.get('fragment')}{', adopted' if r['adopted'] else ''}"
            by_step.setdefault(r["outer_step"], []).append((run_dir.name, r["global_hash"][:12], how))
    diverged = [step for step in sorted(by_step) if len({h for _, h, _ in by_step[step]}) > 1]
    for step in diverged[:steps]:
        lines.append(f"outer step {step}: " + "; ".join(f"{peer} {h} ({how})" for peer, h, how in by_step[step]))
    if not diverged:
        last = max(by_step, default=None)
        lines.append(f"every logged outer step agrees; the last, {last}: {by_step.get(last)}")
    for run_dir in run_dirs:
        log_file = run_dir.parent / f"{run_dir.name}.log"
        if log_file.exists():  # the peer's warnings: adoptions, failed rounds, downloads
            warned = [line for line in log_file.read_text().splitlines() if " WARN" in line][-8:]
            lines += [f"{run_dir.name} log: {line[-220:]}" for line in warned]
    return "\n".join(lines)


def _socket_key(name: str) -> str:
    """A daemon's socket and its client's (same prefix and uid) map to the same key."""
    return name.replace("p2pclient-", "X-").replace("p2pd-", "X-")


def _leftovers(tag: str) -> set[str]:
    """This test's processes (tagged through the environment), and socket files of hivemind
    daemons that no live process uses any more, and every /dev/shm entry."""
    found, in_use = set(), set()
    for proc in psutil.process_iter():
        entry, cmd, environ = proc.pid, proctree.cmdline(proc.pid), proctree.environ(proc.pid)
        # a live daemon's sockets: <prefix>p2pd-<uid>.sock on its command line (-listen=...),
        # and its client's <prefix>p2pclient-<uid>.sock
        in_use.update(_socket_key(part.rsplit("/", 1)[-1]) for part in cmd.split()
                      if part.startswith("-listen=/unix/"))
        if environ.get("DILO_TEST_TAG") == tag:
            found.add(f"{entry}: {cmd[:120]}")
    found |= {f"/tmp/{f}" for f in os.listdir("/tmp")
              if f.startswith(("hivemind-", "dilo-")) and f.endswith(".sock") and _socket_key(f) not in in_use}
    found |= {f"/dev/shm/{f}" for f in os.listdir("/dev/shm")}
    return found


@pytest.fixture
def swarm(procs, tmp_path):
    """A Swarm whose test fails if a process, socket or shared-memory file it made outlives it."""
    tag = uuid.uuid4().hex
    before = _leftovers(tag)
    yield Swarm(procs, tmp_path, tag)
    procs.cleanup()  # a peer still running after a failure is killed first (its reaper cleans up)
    deadline = time.time() + 15
    while (new := _leftovers(tag) - before) and time.time() < deadline:
        time.sleep(0.2)
    assert not new, f"left behind: {sorted(new)}"


# -- tests --------------------------------------------------------------------------------
@pytest.mark.e2e
def test_three_peers_train_and_a_fourth_joins_mid_run(swarm):
    steps = ["--run.steps", "500", "--peers.min_peers", "3"]
    a, a_dir = swarm.start("a", *steps)
    b, b_dir = swarm.start("b", *steps, initial=a_dir)
    c, c_dir = swarm.start("c", *steps, initial=a_dir)
    # d starts once the run is under way (a peer that arrives while the others are still at
    # step 0 starts with them instead), so it must download the state and join mid-run.
    wait_for(lambda: records(a_dir, "sync"), 180, "the first round of a, b, c", [a, b, c])
    d, d_dir = swarm.start("d", *steps, initial=b_dir)
    rcs = [finish(p) for p in (a, b, c, d)]
    assert rcs == [0, 0, 0, 0], swarm.log("d")[-3000:]

    found = [s for run_dir in (a_dir, b_dir, c_dir, d_dir) for s in summaries(run_dir)]
    assert len(found) == 4 and len({s["global_hash"] for s in found}) == 1, agreement_report([a_dir, b_dir, c_dir, d_dir])
    assert all(s["outer_steps"] == 100 and s["inner_steps"] == 500 for s in found)
    joined = [r for r in records(d_dir, "event") if r.get("event") == "swarm"][0]
    assert joined["joined"] and joined["outer_step"] >= 1 and joined["download"]["bytes"] > 0
    # The joiner took part in rounds of all four peers, and every round agrees everywhere.
    assert any(r["peers"] == 4 and not r["adopted"] for r in records(d_dir, "sync"))
    assert hashes_agree_per_step([a_dir, b_dir, c_dir, d_dir]) == 100


def two_peers_then_a_joiner(swarm, args: list[str]) -> tuple[list[Path], list[dict]]:
    """a and b start the run; c joins once a has applied an outer step (the run is under
    way, rounds in flight). Returns the three run dirs and their summaries, all exited 0."""
    a, a_dir = swarm.start("a", *args)
    b, b_dir = swarm.start("b", *args, initial=a_dir)
    wait_for(lambda: records(a_dir, "sync"), 180, "the first outer step of a and b", [a, b])
    c, c_dir = swarm.start("c", *args, initial=a_dir)
    assert [finish(p) for p in (a, b, c)] == [0, 0, 0], swarm.log("c")[-3000:]
    dirs = [a_dir, b_dir, c_dir]
    return dirs, [s for run_dir in dirs for s in summaries(run_dir)]


@pytest.mark.e2e
def test_streaming_swarm_with_fp4_and_error_feedback_admits_a_joiner(swarm):
    """Streaming DiLoCo on the swarm: P = 2 fragments, τ = 1 (exchanges on the background
    thread), fp4 with error feedback; a third peer joins mid-run, adopts every fragment's
    θ and momentum, and all three end with the same hash after every round."""
    streaming = ["--model.n_layers", "2", "--outer.inner_steps", "6", "--outer.fragments", "2",
                 "--outer.delay", "1", "--comm.codec", "fp4", "--comm.error_feedback", "true",
                 "--run.steps", "600", "--peers.min_peers", "2"]
    (a_dir, b_dir, c_dir), found = two_peers_then_a_joiner(swarm, streaming)
    assert len(found) == 3 and len({s["global_hash"] for s in found}) == 1, agreement_report([a_dir, b_dir, c_dir])
    # 600 steps x P / H = 200 fragment rounds, + 1: the drain sends fragment 1's last steps. A
    # peer left behind in the last rounds adopts the final state and stands at its place in the
    # schedule, 201 x H / P = 603 inner steps (seen in repeated runs), the others at 600.
    assert all(s["outer_steps"] == 201 and s["inner_steps"] in (600, 603) and s["fragments"] == 2 for s in found)
    joined = [r for r in records(c_dir, "event") if r.get("event") == "swarm"][0]
    assert joined["joined"] and joined["outer_step"] >= 1
    assert {r["fragment"] for r in records(c_dir, "sync")} == {0, 1}
    assert any(r["peers"] == 3 and not r["adopted"] for r in records(c_dir, "sync"))
    assert any(r["seconds_hidden"] > 0 for r in records(a_dir, "sync"))
    assert hashes_agree_per_step([a_dir, b_dir, c_dir]) == 201


@pytest.mark.e2e
def test_overlapped_swarm_admits_a_joiner_that_fetches_the_rounds_in_flight(swarm):
    """outer.overlap eager on the swarm, P = 2 fragments: every round is applied two rounds
    after it ran, so a state is never alone. The third peer joins mid-run, fetches the
    results of the rounds in flight at the state it downloaded (round_result) and applies
    them on schedule; all three agree after every outer step and end with the same hash."""
    overlapped = ["--model.n_layers", "2", "--outer.inner_steps", "6", "--outer.fragments", "2",
                  "--outer.overlap", "eager", "--outer.momentum", "0", "--outer.nesterov", "false",
                  "--run.steps", "600", "--peers.min_peers", "2"]
    (a_dir, b_dir, c_dir), found = two_peers_then_a_joiner(swarm, overlapped)
    assert len(found) == 3 and len({s["global_hash"] for s in found}) == 1, agreement_report([a_dir, b_dir, c_dir])
    # 200 rounds + 1 sent by the drain (fragment 1's last steps), all applied
    assert all(s["outer_steps"] == 201 and s["overlap"] == "eager" for s in found)
    joined = [r for r in records(c_dir, "event") if r.get("event") == "swarm"][0]
    assert joined["joined"] and joined["outer_step"] >= 1
    assert any(r["name"] == "round_results_fetched" for r in records(c_dir, "counter"))
    assert any(r["peers"] == 3 and not r["adopted"] for r in records(c_dir, "sync"))
    assert any(r["seconds_hidden"] > 0 for r in records(a_dir, "sync"))
    assert hashes_agree_per_step([a_dir, b_dir, c_dir]) == 201


@pytest.mark.e2e
def test_peer_killed_mid_exchange_survivors_agree(swarm):
    """c dies in round 4 after its averaged chunk reached one survivor but not the other:
    one survivor completes the round, the other detects the partial round, applies nothing
    and takes the completed state; both finish with the same hash."""
    steps = ["--run.steps", "60", "--peers.min_peers", "3"]
    a, a_dir = swarm.start("a", *steps)
    b, b_dir = swarm.start("b", *steps, initial=a_dir)
    c, c_dir = swarm.start("c", *steps, initial=a_dir, kill_at="4:2")
    assert finish(c) == -signal.SIGKILL, swarm.log("c")[-3000:]  # (it must die by its own hook, not fail)
    assert [finish(a), finish(b)] == [0, 0], swarm.log("a")[-3000:] + swarm.log("b")[-3000:]
    found = summaries(a_dir) + summaries(b_dir)
    assert len({s["global_hash"] for s in found}) == 1 and all(s["outer_steps"] == 12 for s in found)
    assert hashes_agree_per_step([a_dir, b_dir, c_dir]) == 12
    logs = swarm.log("a") + swarm.log("b")
    assert "nothing applied" in logs  # the partial round was detected and not applied
    assert not any(r["peers"] == 3 for run_dir in (a_dir, b_dir) for r in records(run_dir, "sync")
                   if r["outer_step"] > 5)


@pytest.mark.e2e
def test_wrong_key_and_other_model_are_refused_by_the_cli(swarm):
    """The same refusals as test_swarm_parts, end to end: exit code 2 and both sides' logs,
    then Ctrl-C on the member that refused them."""
    a, a_dir = swarm.start("a", "--run.steps", "20", "--peers.min_peers", "2", "--comm.timeout", "600")
    wrong_key = swarm.tmp / "other.key"
    wrong_key.write_text("not-the-run-key-0123456789")
    b, _ = swarm.start("b", "--run.steps", "20", "--peers.key_file", str(wrong_key), initial=a_dir)
    c, _ = swarm.start("c", "--run.steps", "20", "--model.d_model", "64", initial=a_dir)
    assert finish(b, 120) == 2 and "does not hold the swarm's run key" in swarm.log("b")
    assert finish(c, 120) == 2 and "model.d_model (this peer 64, the swarm 32)" in swarm.log("c")
    wait_for(lambda: swarm.log("a").count("refused peer") >= 2, 30, "a to log both refusals", [a])
    assert "it does not hold the run key" in swarm.log("a") and "model.d_model" in swarm.log("a")
    os.kill(a.pid, signal.SIGINT)  # Ctrl-C: a leaves cleanly (no_leftovers checks its daemon)
    assert finish(a, 60) == 130


@pytest.mark.e2e
@pytest.mark.parametrize("overlap", ["none", "eager"])
def test_a_torchrun_peer_of_two_ranks_trains_with_a_one_process_peer(swarm, overlap):
    """Under torchrun the ranks form one worker (data-parallel inside); only rank 0 talks to
    the swarm, and every rank ends on the swarm's global state (with overlapped outer steps
    too: every rank applies each round at the same step)."""
    steps = ["--run.steps", "40", "--peers.min_peers", "2", "--outer.overlap", overlap]
    a, a_dir = swarm.start("a", *steps)
    b_dir = swarm.tmp / "b"
    b = swarm.start_cmd("b", torchrun_cmd(2, [*SWARM, *steps, "--run.dir", str(b_dir), "--run.worker_size", "2",
                                              "--peers.key_file", str(swarm.key_file),
                                              "--peers.initial", swarm.address(a_dir)]))
    assert [finish(a), finish(b)] == [0, 0], swarm.log("a")[-2000:] + swarm.log("b")[-3000:]
    found = summaries(a_dir) + summaries(b_dir)
    assert len(found) == 2 and len({s["global_hash"] for s in found}) == 1
    assert [s["worker_size"] for s in found] == [1, 2] and all(s["outer_steps"] == 8 for s in found)
    assert hashes_agree_per_step([a_dir, b_dir]) == 8  # rank 1's metrics file included
    assert len(list(b_dir.glob("metrics-peer-*.1.jsonl"))) == 1
    assert any(r["peers"] == 2 for r in records(b_dir, "sync"))


@pytest.mark.e2e
@pytest.mark.slow
def test_two_peers_of_different_batch_sizes_weight_by_tokens(swarm):
    """outer.weighting = tokens on the swarm (docs/uneven.md): peer b trains on half the tokens
    per step, so it counts a third in every round of both; one global state every outer step."""
    common = ["--run.steps", "30", "--peers.min_peers", "2", "--outer.weighting", "tokens",
              "--outer.aggregate", "mean"]
    a, a_dir = swarm.start("a", *common, "--data.batch_size", "4")
    b, b_dir = swarm.start("b", *common, "--data.batch_size", "2", initial=a_dir)
    assert [finish(p) for p in (a, b)] == [0, 0], swarm.log("b")[-3000:]
    assert hashes_agree_per_step([a_dir, b_dir]) == 6
    together = [r for r in records(b_dir, "sync") if r["peers"] == 2]
    assert together and all(r["weight"] == pytest.approx(1 / 3) for r in together)
