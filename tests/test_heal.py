"""run.failover = heal: membership epochs and decisions (in-process store), a healing group
that redoes a failed exchange without the dead member (threads, gloo), and one e2e run
(3 workers, one SIGKILLed and restarted, survivors never restart, one hash per outer step,
bit-identical to restart mode before the fault)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.distributed import HashStore

from dilo.aggregate import Aggregate
from dilo.codecs import get_codec
from dilo.comm.heal import HealingGroup
from dilo.comm.membership import Epoch, HealError, Membership, Superseded
from dilo.comm.protocol import RoundReport
from dilo.config import parse_args
from tests.helpers import REPO, SMALL, free_port, run_workers, torchrun_cmd
from tools.proctree import descendants

TIMEOUT = 0.6  # heartbeat timeout of the in-process tests (beats every 0.12 s)


def members(store, n: int, slots: int | None = None, beat: bool = True) -> list[Membership]:
    out = [Membership(store, s, slots or n, timeout=TIMEOUT) for s in range(n)]
    if beat:
        for m in out:
            m.start_heartbeat()
    return out


def stop_all(ms: list[Membership]) -> None:
    for m in ms:
        if m.heartbeat is not None:
            m.heartbeat.stop()


def form(ms: list[Membership]) -> list[Epoch]:
    return run_workers(lambda r: ms[r].join(len(ms), len(ms), grace=60), len(ms), timeout=30)


# -- membership: epochs and decisions ---------------------------------------------------------
def test_workers_form_one_epoch_sorted_by_slot_and_agree_on_every_decision():
    store = HashStore()
    ms = members(store, 3)
    try:
        epochs = form(ms)
        assert {e.to_json() for e in epochs} == {epochs[0].to_json()}  # one record for everyone
        e = epochs[0]
        assert e.number == 0 and e.kind == "form" and [s for s, _ in e.members] == [0, 1, 2]
        # All ok: committed on every member. One failure: aborted on every member, all three survive.
        ok = run_workers(lambda r: ms[r].decide(e, 0, True), 3)
        assert all(d.committed(e) for d in ok)
        bad = run_workers(lambda r: ms[r].decide(e, 1, r != 1), 3)
        assert not any(d.committed(e) for d in bad)
        assert all(d.survivors(e) == e.members for d in bad)
    finally:
        stop_all(ms)


def test_a_silent_member_is_dropped_once_its_heartbeat_stops_and_a_pending_joiner_is_seen():
    store = HashStore()
    ms = members(store, 3)
    try:
        e = form(ms)[0]
        ms[2].heartbeat.stop()  # slot 2 hangs: it never writes its outcome
        start = time.monotonic()
        decisions = run_workers(lambda r: ms[r].decide(e, 0, True), 2)
        waited = time.monotonic() - start
        assert all(not d.committed(e) and d.survivors(e) == e.members[:2] for d in decisions)
        assert waited < 5 * TIMEOUT  # the heartbeat's timeout, not a collective timeout
        # A restarted slot 2 registers; the members see it in the next committed decision.
        healed = ms[0].propose(1, Epoch(1, e.members[:2], "heal", e.world))
        joiner = Membership(store, 2, 3, timeout=TIMEOUT)
        joiner.start_heartbeat()
        joiner.register()
        ms.append(joiner)
        # Seen once its heartbeat was seen to move (a just-killed incarnation never is).
        run_workers(lambda r: ms[r].decide(healed, 0, True, look_for_joiners=True), 2)
        time.sleep(0.3)
        seen = run_workers(lambda r: ms[r].decide(healed, 1, True, look_for_joiners=True), 2)
        assert all(d.committed(healed) and d.joiners(healed) == [joiner.me] for d in seen)
    finally:
        stop_all(ms)


def test_a_worker_of_a_running_group_waits_for_admission():
    store = HashStore()
    ms = members(store, 2, slots=3)
    try:
        e = run_workers(lambda r: ms[r].join(3, 2, grace=0.0), 2, timeout=30)[0]  # min_workers 2, no grace
        assert [s for s, _ in e.members] == [0, 1]
        joiner = Membership(store, 2, 3, timeout=TIMEOUT)
        joiner.start_heartbeat()
        ms.append(joiner)
        found: list = []
        t = threading.Thread(target=lambda: found.append(joiner.join(3, 2, grace=60)), daemon=True)
        t.start()
        time.sleep(0.5)
        assert not found  # a live group exists: it waits, it does not form one
        admitted = ms[0].propose(1, Epoch(1, sorted(e.members + [joiner.me]), "admit", e.world, [joiner.me]))
        t.join(10)
        assert found and found[0].to_json() == admitted.to_json()
    finally:
        stop_all(ms)


def test_bad_slot_is_refused():
    with pytest.raises(ValueError, match="run.slot 3"):
        Membership(HashStore(), 3, 3)


# -- the healing group: a failed exchange is redone by the survivors -----------------------------
def test_an_exchange_that_loses_a_member_is_redone_by_the_survivors_with_the_same_vectors():
    store = HashStore()
    ms = members(store, 3)
    vectors = [torch.randn(1000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    fp32 = get_codec("fp32")
    try:
        epoch = form(ms)[0]
        # gloo times out after 3 s; a stopped member must cost the heartbeat's 0.6 s, not that
        groups = [HealingGroup(m, store, epoch, timeout_s=3, min_workers=2) for m in ms]
        for g in groups:
            g.healable = True
        first = run_workers(lambda r: groups[r].average(vectors[r], fp32).average, 3)
        assert all(torch.equal(a, first[0]) for a in first)
        assert torch.equal(first[0], (vectors[0] + vectors[1] + vectors[2]) / 3)
        # Slot 2 stops (no heartbeat, no exchange): the others' exchange is abandoned, they heal
        # to a 2-member epoch and redo it; the mean is theirs alone, the same bytes on both.
        ms[2].heartbeat.stop()
        start = time.monotonic()
        second = run_workers(lambda r: groups[r].average(vectors[r], fp32).average, 2, timeout=30)
        assert time.monotonic() - start < 2.5
        assert torch.equal(second[0], second[1]) and torch.equal(second[0], (vectors[0] + vectors[1]) / 2)
        assert [g.size for g in groups[:2]] == [2, 2] and groups[0].epoch.kind == "heal" and groups[0].changed
        # Fewer than min_workers cannot heal: the restart-the-world fallback.
        ms[1].heartbeat.stop()
        with pytest.raises(HealError, match="run.min_workers"):
            groups[0].average(vectors[0], fp32)
        for g in groups:
            g.close()  # (waits for the abandoned ops to time out)
    finally:
        stop_all(ms)


def test_the_healing_group_carries_round_reports_and_runs_the_sparse_gather():
    """The exchange options of a torch group work in heal mode too: token weights travel with
    the contributions, and the sparse codec's all-gather exchange gives one result everywhere."""
    store = HashStore()
    ms = members(store, 3)
    vectors = [torch.randn(3000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    tokens = [100.0, 200.0, 300.0]
    try:
        epoch = form(ms)[0]
        groups = [HealingGroup(m, store, epoch, timeout_s=10, min_workers=2) for m in ms]
        weighted = Aggregate("mean", weighting="tokens")
        out = run_workers(lambda r: groups[r].average(vectors[r], get_codec("fp32"), aggregate=weighted,
                                                      report=RoundReport(tokens[r], 1.0)), 3)
        assert all(torch.equal(o.average, out[0].average) for o in out)
        assert [t[0] for t in out[0].reports] == tokens
        expected = sum(v.double() * (w / 200.0) for v, w in zip(vectors, tokens)) / 3
        assert torch.allclose(out[0].average.double(), expected, atol=1e-6)
        sparse = get_codec("sparse", density=0.1, sparse_block=256)
        got = run_workers(lambda r: groups[r].average(vectors[r], sparse).average, 3)
        assert all(torch.equal(g, got[0]) for g in got)
        one = [sparse.decode(sparse.encode(v), v.numel()) for v in vectors]
        assert torch.allclose(got[0], sum(one) / 3, atol=1e-6)
        for g in groups:
            g.close()
    finally:
        stop_all(ms)


def test_a_member_whose_epoch_was_superseded_without_it_stops_instead_of_going_on_alone():
    """The last member of an epoch is stopped (SIGSTOP) past the heartbeat timeout: restarted
    workers see no live group and form a new world without it. When it runs again, its next
    collective must fail (HealError: restart and rejoin), not commit alone (a split brain, two
    worlds training the same run; found by tools/chaos.py --backend heal)."""
    store = HashStore()
    ms = members(store, 2)
    try:
        alone = ms[0].join(2, 1, grace=0.0)  # slot 0 forms a group of one (min_workers 1, no grace)
        assert [s for s, _ in alone.members] == [0]
        group = HealingGroup(ms[0], store, alone, timeout_s=3, min_workers=1)
        group.healable = True
        v = torch.ones(8)
        assert torch.equal(group.average(v, get_codec("fp32")).average, v)
        ms[1].propose(alone.number + 1, Epoch(alone.number + 1, [ms[1].me], "form", "other-world"))
        with pytest.raises(Superseded, match="superseded by epoch 1"):
            group.average(v, get_codec("fp32"))
        group.close()
    finally:
        stop_all(ms)


def test_a_stalled_member_learns_at_once_that_it_was_left_behind_and_rejoins_as_a_new_incarnation():
    """Slot 2 is silent past the heartbeat timeout while the others exchange: they decide without
    it and heal. Its heartbeat thread saw the gap, so its next `check_left_behind` (one per inner
    step, a store look-up only after a stall) raises Superseded before its next collective; it
    leaves, becomes a new incarnation (new nonce, its own heartbeat; the old one stays dead) and is
    admitted like a restarted worker. Without a stall the check reads no store at all."""
    store = HashStore()
    ms = members(store, 3)
    try:
        e = form(ms)[0]
        groups = [HealingGroup(m, store, e, timeout_s=3, min_workers=2) for m in ms]
        calls = []
        check = ms[2].store.check
        ms[2].store = type("Counting", (), {"__getattr__": lambda _, k: getattr(store, k),
                                            "check": lambda _, keys: calls.append(keys) or check(keys)})()
        groups[2].check_left_behind()
        groups[2].check_left_behind()
        assert not calls  # no stall seen: no store round trip
        time.sleep(TIMEOUT * 0.6)  # more than heartbeat / 2 since the last call: the loop saw a gap itself
        groups[2].check_left_behind()  # (asks the store; still a member: no error)
        assert calls
        calls.clear()
        # "SIGSTOP" slot 2: its heartbeat thread stops beating (a gap), the others decide without it.
        beat = ms[2].heartbeat
        beat._stop.set()
        beat._thread.join()
        decisions = run_workers(lambda r: ms[r].decide(e, 0, True), 2, timeout=30)
        assert decisions[0].survivors(e) == e.members[:2]
        beat.stalled_at = time.monotonic()  # (what its thread notes when the process runs again)
        # The decision alone (the heal epoch not written yet) already tells it; then the epoch.
        with pytest.raises(Superseded, match="decided collective 0 of epoch 0 without this worker"):
            groups[2].check_left_behind()
        healed = ms[0].propose(1, Epoch(1, e.members[:2], "heal", e.world))
        with pytest.raises(Superseded, match="superseded by epoch 1"):
            groups[2].check_left_behind()
        assert calls
        ms[2].store = store
        old = ms[2].me
        groups[2].leave()
        assert not groups[2].admitted and ms[2].me != old and ms[2].me[0] == 2 and groups[2].world_id == e.world
        time.sleep(TIMEOUT * 1.5)
        assert ms[0].liveness.dead(old[1])
        found: list = []
        t = threading.Thread(target=lambda: found.append(ms[2].join(3, 2, grace=60, may_form=False)), daemon=True)
        t.start()
        time.sleep(1.0)  # (some 8 beats: its own, and the members' watches of it)
        # The first decision after it registered sees it: the members' heartbeat threads watched
        # its counter move (their decisions alone would need two, a round apart).
        seen = run_workers(lambda r: ms[r].decide(healed, 0, True, look_for_joiners=True), 2)
        assert seen[0].joiners(healed) == [ms[2].me]  # the new incarnation, not the dead one
        admitted = ms[0].propose(2, Epoch(2, sorted(healed.members + [ms[2].me]), "admit", e.world, [ms[2].me]))
        t.join(10)
        assert found and found[0].to_json() == admitted.to_json()
        # With no live group left a rejoin does not form a world of its own: it restarts.
        stop_all(ms)
        with pytest.raises(HealError, match="no live group left to rejoin"):
            Membership(store, 1, 3, timeout=TIMEOUT).join(3, 1, grace=0.0, may_form=False)
        for g in groups:
            g.close()
    finally:
        stop_all(ms)


def test_a_heal_world_resumes_from_checkpoints_by_group_rank_when_slots_have_gaps(tmp_path):
    """Restart-the-world inside heal mode: slots 0, 2, 3 form a world of 3 (slot 1 is gone) and
    resume from checkpoints; the newest file is slot 3's. The survey is by slot, the broadcast
    by the rank in the group (dilo/checkpointing.py passes the group's rank): every member
    gets that state (the world's rank, 0 in every heal worker, broke the broadcast)."""
    from dilo import checkpoint, resume
    from dilo.comm.local import local_groups

    def state(step: int, worker: int) -> dict:
        return {"outer_step": step, "num_workers": 4, "exact": True, "global_hash": f"h{step}",
                "theta": torch.full((5000,), float(step)), "worker": worker}

    checkpoint.save(tmp_path, 0, 4, state(4, 0), keep=2, num_workers=4)
    checkpoint.save(tmp_path, 3, 5, state(5, 3), keep=2, num_workers=4)
    slots, groups = [0, 2, 3], local_groups(3)
    found = run_workers(lambda r: resume.resume(resume.ResumeContext(str(tmp_path), "auto", slots[r], 3, r,
                                                                     groups[r])), 3)
    assert [f.plan.kind for f in found] == ["elastic"] * 3 and {f.plan.source_worker for f in found} == {3}
    assert all(f.state["global_hash"] == "h5" and torch.equal(f.state["theta"], torch.full((5000,), 5.0))
               for f in found)


def test_heal_keys_are_checked():
    base = ["--run.failover", "heal", "--run.workers", "3", "--comm.store", "127.0.0.1:1234"]
    assert parse_args(base + ["--run.slot", "2"]).run.failover == "heal"
    for extra, message in ((["--run.slot", "3"], "run.slot"), (["--run.min_workers", "4"], "run.min_workers"),
                           (["--outer.overlap", "delayed"], "outer.overlap"),
                           (["--outer.target_tokens", "1000", "--outer.inner_steps", "0"], "outer.target_tokens"),
                           (["--run.failover", "x"], "run.failover")):
        with pytest.raises(ValueError, match=message):
            parse_args(base + extra)
    with pytest.raises(ValueError, match="comm.store"):
        parse_args(["--run.failover", "heal", "--run.workers", "3"])


# -- e2e ---------------------------------------------------------------------------------------
def sync_hashes(run_dir: Path, pattern: str = "metrics-*.jsonl") -> dict[int, set[str]]:
    """outer step -> the global hashes logged for it in the run's sync lines."""
    found: dict[int, set[str]] = defaultdict(set)
    for f in run_dir.glob(pattern):
        for line in f.read_text().splitlines():
            r = json.loads(line) if line.endswith("}") else {"kind": "partial"}
            if r["kind"] == "sync":
                found[r["outer_step"]].add(r["global_hash"])
    return found


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "event"]


def test_heal_worker_tells_each_worker_its_share_of_the_machine(tmp_path):
    """launch/heal_worker.sh passes LOCAL_WORKERS / LOCAL_SLOT on as LOCAL_WORLD_SIZE / LOCAL_RANK
    (dilo's CPU threads per worker and its GPU), never RANK/WORLD_SIZE, and refuses a bad slot."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"lws=$LOCAL_WORLD_SIZE lr=$LOCAL_RANK rank=${RANK-none} args=$*\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(STORE="127.0.0.1:1", WORKERS="4", SLOT="3", PYTHON=str(fake), LOCAL_WORKERS="2", LOCAL_SLOT="1")
    script = str(REPO / "launch" / "heal_worker.sh")
    out = subprocess.run(["bash", script, "--run.steps", "5"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "lws=2 lr=1 rank=none" in out.stdout and "--run.slot 3" in out.stdout
    alone = {k: v for k, v in env.items() if k not in ("LOCAL_WORKERS", "LOCAL_SLOT")}
    out = subprocess.run(["bash", script], env=alone, capture_output=True, text=True, timeout=30)
    assert "lws=1 lr=0" in out.stdout
    out = subprocess.run(["bash", script], env={**env, "LOCAL_SLOT": "2"}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "LOCAL_SLOT must be 0 .. LOCAL_WORKERS-1" in out.stderr


def start_heal_run(procs, tmp_path: Path, args: list[str]) -> list:
    """A store and 3 launch/heal_worker.sh loops (logs w<slot>.log); returns once slot 1 has
    logged outer step 3."""
    port = free_port()
    store = procs.start([sys.executable, "-m", "dilo.rendezvous_store", "--host", "127.0.0.1", "--port", str(port)],
                        tmp_path / "store.log")
    run = Path(args[args.index("--run.dir") + 1])
    env = {"STORE": f"127.0.0.1:{port}", "WORKERS": "3", "PYTHON": sys.executable, "RESTART_DELAY": "0.2"}
    loops = [procs.start(["bash", str(REPO / "launch" / "heal_worker.sh"), *args], tmp_path / f"w{s}.log",
                         env={**env, "SLOT": str(s)}) for s in range(3)]
    deadline = time.monotonic() + 120
    while max(sync_hashes(run, "metrics-1.jsonl"), default=0) < 3:
        assert time.monotonic() < deadline and store.poll() is None, (tmp_path / "w1.log").read_text()[-3000:]
        time.sleep(0.1)
    return loops


def train_pid(loop) -> int:
    """The dilo.train process a heal_worker.sh loop runs now."""
    return next(p for p in descendants(loop.pid) if "dilo.train" in Path(f"/proc/{p}/cmdline").read_text())


@pytest.mark.e2e
def test_survivors_keep_training_and_a_restarted_worker_joins(procs, tmp_path):
    args = SMALL + ["--run.steps", "1000", "--outer.inner_steps", "10", "--checkpoint.every", "0",
                    "--comm.timeout", "20", "--comm.heartbeat", "2"]
    run = tmp_path / "heal"
    loops = start_heal_run(procs, tmp_path, args + ["--run.dir", str(run)])
    subprocess.run(["kill", "-9", str(train_pid(loops[1]))], check=True)
    for s, loop in enumerate(loops):
        assert loop.wait(timeout=120) == 0, (tmp_path / f"w{s}.log").read_text()[-3000:]
    # Survivors never restarted (one start each); slot 1 started twice and downloaded the state.
    starts = {s: sum(e["event"] == "start" for e in events(run / f"metrics-{s}.jsonl")) for s in range(3)}
    assert starts == {0: 1, 1: 2, 2: 1}
    assert any(e["event"] == "heal" and e["lost"] == [1] for e in events(run / "metrics-0.jsonl"))
    assert any(e["event"] == "admit" and e["joined"] == [1] for e in events(run / "metrics-0.jsonl"))
    assert any(e["event"] == "resume" and e["how"] == "live" for e in events(run / "metrics-1.jsonl"))
    hashes = sync_hashes(run)
    assert sorted(hashes) == list(range(1, 101)) and all(len(h) == 1 for h in hashes.values())
    finals = {json.loads(p.read_text())["global_hash"] for p in run.glob("summary-*.json")}
    assert len(finals) == 1 and len(list(run.glob("summary-*.json"))) == 3
    # Before the fault the run is restart mode's, bit for bit (same seed, torchrun world of 3).
    ref = tmp_path / "restart"
    assert procs.run(torchrun_cmd(3, args + ["--run.dir", str(ref)]), tmp_path / "ref.log").returncode == 0
    reference = sync_hashes(ref)
    heal_event = next(e for e in events(run / "metrics-0.jsonl") if e["event"] == "heal")
    before = [step for step in hashes if step < heal_event["outer_step"]]
    assert before and all(hashes[step] == reference[step] for step in before)


@pytest.mark.e2e
def test_a_stalled_worker_rejoins_without_a_new_process(procs, tmp_path):
    """Slot 1 is SIGSTOPped past comm.heartbeat: the others heal without it. Resumed, it finds
    out at its next inner step, rejoins in the same process (a `rejoin` event, how = in_process),
    is admitted and downloads the state; every outer step has one global hash, the run finishes."""
    args = SMALL + ["--run.steps", "800", "--outer.inner_steps", "10", "--checkpoint.every", "0",
                    "--comm.timeout", "20", "--comm.heartbeat", "1.5",
                    "--run.slowdown", "0:4,1:4,2:4"]  # (rounds of ~0.2 s: the run outlasts the stall)
    run = tmp_path / "heal"
    loops = start_heal_run(procs, tmp_path, args + ["--run.dir", str(run)])
    worker = train_pid(loops[1])
    os.kill(worker, signal.SIGSTOP)
    time.sleep(4)  # > comm.heartbeat: the others drop it
    os.kill(worker, signal.SIGCONT)
    for s, loop in enumerate(loops):
        assert loop.wait(timeout=120) == 0, (tmp_path / f"w{s}.log").read_text()[-3000:]
    starts = {s: sum(e["event"] == "start" for e in events(run / f"metrics-{s}.jsonl")) for s in range(3)}
    assert starts == {0: 1, 1: 1, 2: 1}  # nobody restarted, slot 1 included
    assert "slot 1 rejoins in-process" in (tmp_path / "w1.log").read_text()
    mine = events(run / "metrics-1.jsonl")
    assert any(e["event"] == "rejoin" and e["how"] == "in_process" for e in mine)
    resumed = next(e for e in mine if e["event"] == "resume" and e["how"] == "live")
    assert resumed["outer_step"] < 80 and max(sync_hashes(run, "metrics-1.jsonl")) == 80  # it trained on
    assert any(e["event"] == "heal" and e["lost"] == [1] for e in events(run / "metrics-0.jsonl"))
    assert any(e["event"] == "admit" and e["joined"] == [1] for e in events(run / "metrics-0.jsonl"))
    hashes = sync_hashes(run)
    assert sorted(hashes) == list(range(1, 81)) and all(len(h) == 1 for h in hashes.values())
    finals = {json.loads(p.read_text())["global_hash"] for p in run.glob("summary-*.json")}
    assert len(finals) == 1 and len(list(run.glob("summary-*.json"))) == 3
