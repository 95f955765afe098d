"""Overlapped outer steps with a group of open membership (the swarm's contract), in one process.

A fake swarm stands for the network: the result of exchange t is whatever the first member
to run it contributed, the same bytes for every member, and every `RoundId` and digest a
member uses is checked against the others'. A worker that adopts another's state while
exchanges are in flight must fetch those rounds' results, apply them at the same steps,
number its own exchanges like the others and end with the same global state.
"""

from __future__ import annotations

import pytest
import torch

from dilo import DiLoCo
from dilo.comm.protocol import ExchangeResult, GlobalState, Group, RoundId
from tests.helpers import Net, adamw, inner_step

H, STEPS = 6, 60


class Ledger:
    """What the swarm agreed on: each round's result and key, each outer step's digest."""

    def __init__(self):
        self.results: dict[int, torch.Tensor] = {}
        self.keys: dict[int, str] = {}
        self.digests: dict[int, str] = {}
        self.fetched: list[int] = []


class FakeSwarm(Group):
    open_membership = True
    rank, size = 0, 2

    def __init__(self, ledger: Ledger, join: GlobalState | None = None):
        self.ledger, self.join = ledger, join

    def bind(self, state):
        return self.join

    def average(self, flat, codec, round: RoundId | None = None, owner_error: bool = False) -> ExchangeResult:
        assert self.ledger.keys.setdefault(round.number, round.base) == round.base, \
            f"round {round.number} started from another state"
        average = self.ledger.results.setdefault(round.number, codec.decode(codec.encode(flat), flat.numel()))
        return ExchangeResult(average.clone(), 0, 0, 2, 0.0)

    def round_result(self, number: int) -> ExchangeResult:
        self.ledger.fetched.append(number)
        return ExchangeResult(self.ledger.results[number].clone(), 0, 0, 2, 0.0)

    def confirm(self, outer_step, digest):
        assert self.ledger.digests.setdefault(outer_step, digest) == digest, f"diverged at outer step {outer_step}"
        return None

    def broadcast(self, flat, src=0):
        raise AssertionError("a group of open membership has no broadcast")

    def all_gather_object(self, obj):
        raise AssertionError("a group of open membership has no all_gather")


def run(diloco: DiLoCo, model, opt, worker: int, start: int, stop: int, on_step=None) -> None:
    for step in range(start, stop):
        inner_step(model, opt, worker, step)
        diloco.step()
        if on_step is not None:
            on_step(step + 1)
    if stop == STEPS:
        diloco.flush()


class Behind(FakeSwarm):
    """A member the others went on without: exchange `number` hands back their newer state."""

    def __init__(self, ledger: Ledger, number: int, newer: GlobalState):
        super().__init__(ledger)
        self.number, self.newer = number, newer

    def average(self, flat, codec, round=None, owner_error=False):
        if round.number == self.number:
            return ExchangeResult(torch.empty(0), 0, 0, 1, 0.0, adopted=self.newer)
        return super().average(flat, codec, round)


def make(ledger: Ledger, overlap: str, join: GlobalState | None = None, group: Group | None = None):
    model = Net()
    opt = adamw(model)
    diloco = DiLoCo(model, opt, inner_steps=H, group=group or FakeSwarm(ledger, join), codec="int8", fragments=2,
                    overlap=overlap, delay=1, outer_momentum=0.5)
    return diloco, model, opt


def train_to_the_end(late: DiLoCo, model, opt, **outer) -> list:
    """Trainer.run's loop around `late` (its inner step replaced by the test's): the trainer's
    outer-step boundary and its drain at the end, without a world around it; `outer`: the
    config's outer.* keys that `late` was built with. Returns the sync stats."""
    from types import SimpleNamespace

    from dilo.config import Config
    from dilo.rounds import RoundClock
    from dilo.train import Trainer
    from dilo.worker_state import WorkerState

    cfg = Config()
    cfg.run.steps, cfg.outer.inner_steps, cfg.outer.fragments = STEPS, H, 2
    for key, value in outer.items():
        setattr(cfg.outer, key, value)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.diloco, trainer.groups = cfg, late, SimpleNamespace(swarm=None)
    trainer.state = WorkerState(cfg, 1, 2, model, opt, SimpleNamespace(state_dict=dict), late)
    trainer.rounds = RoundClock(cfg, None, trainer.state.totals)
    synced = []
    trainer.report = SimpleNamespace(sync=lambda stats, loss: synced.append(stats))
    while not trainer.at_end():
        inner_step(model, opt, 1, trainer.state.inner_step)
        trainer.state.inner_step += 1
        trainer.outer_boundary(torch.zeros(()))
    return synced


@pytest.mark.parametrize("overlap", ["none", "delayed", "eager"])
@pytest.mark.parametrize("join_at", [14, 25, 30])
def test_a_member_that_adopts_mid_run_fetches_the_rounds_in_flight_and_agrees(overlap, join_at):
    ledger = Ledger()
    first, model, opt = make(ledger, overlap)
    snapshot = {}

    def take(step):  # a joiner downloads the state as it is at this step
        if step == join_at:
            snapshot["state"] = first.export_state()
            snapshot["rounds"] = first.outer_step + len(first.in_flight)

    run(first, model, opt, 0, 0, STEPS, take)
    state = snapshot["state"]
    lag = 2 if overlap != "none" else 0
    assert state.in_flight == snapshot["rounds"] - state.outer_step and state.in_flight <= lag + 1

    joiner, model2, opt2 = make(ledger, overlap, join=state)
    missed = min(lag, state.in_flight)
    assert joiner.outer_step == state.outer_step and joiner.inner_step == (state.outer_step + missed) * (H // 2)
    assert len(joiner.in_flight) == missed
    run(joiner, model2, opt2, 1, joiner.inner_step, STEPS)
    # It applied the fetched rounds on schedule, numbered its own rounds like the first
    # member (the fake refuses another key) and confirmed every outer step's digest.
    assert ledger.fetched == list(range(state.outer_step, state.outer_step + missed))
    assert joiner.outer_step == first.outer_step and joiner.global_hash() == first.global_hash()
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model2.parameters()]),
                       torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_a_state_adopted_from_an_exchange_supersedes_the_rounds_started_before_it():
    """An exchange that hands back a newer state (the member fell behind): the member adopts
    it at its next step, the exchanges it had started from the old state are never applied,
    and it goes on from the adopted state's schedule."""
    ledger = Ledger()
    leader, model, opt = make(ledger, "eager")
    snapshot = {}
    run(leader, model, opt, 0, 0, STEPS, lambda s: snapshot.setdefault(s, leader.export_state()) if s == 40 else None)
    newer = snapshot[40]
    late, model2, opt2 = make(ledger, "eager", group=Behind(ledger, 3, newer))  # others went on without it
    step = 0
    while late.outer_step < newer.outer_step and step < STEPS:
        inner_step(model2, opt2, 1, step)
        stats = late.step()
        step = late.inner_step if stats is not None and stats.adopted else step + 1
    assert late.outer_step == newer.outer_step
    assert late.inner_step == (newer.outer_step + min(2, newer.in_flight)) * (H // 2)
    run(late, model2, opt2, 1, late.inner_step, STEPS)
    assert late.global_hash() == leader.global_hash()


def test_a_state_adopted_at_the_end_of_the_run_is_drained_before_the_run_ends():
    """The trainer, not DiLoCo alone: a member that falls behind near the end adopts a state
    that a donor exported during its last drain (outer step N − 1, the drain round still in
    flight). That state's schedule is past run.steps, so the loop ends at once; the round
    fetched with it must still be applied, or the member ends one outer step short, with
    another final hash than every other peer (seen once as a flaky
    tests/test_swarm.py::test_overlapped_swarm_admits_a_joiner_that_fetches_the_rounds_in_flight)."""
    ledger = Ledger()
    ledger.states = {}
    first, model, opt = make(ledger, "eager")
    first.group.confirm = lambda outer_step, digest: (FakeSwarm.confirm(first.group, outer_step, digest),
                                                       ledger.states.setdefault(outer_step, first.export_state()))[0]
    run(first, model, opt, 0, 0, STEPS)
    final = first.outer_step
    newer = ledger.states[final - 1]  # exported while the drain's last round was in flight
    assert newer.in_flight >= 1 and (newer.outer_step + min(2, newer.in_flight)) * (H // 2) >= STEPS

    # the others went on to the end without this member
    late, model2, opt2 = make(ledger, "eager", group=Behind(ledger, final - 6, newer))
    synced = train_to_the_end(late, model2, opt2, overlap="eager")
    assert any(s.adopted and s.outer_step == final - 1 for s in synced)
    assert len(late.in_flight) == 0 and ledger.fetched[-1] == final - 1
    assert late.outer_step == final and late.global_hash() == first.global_hash()


@pytest.mark.parametrize("moment", ["after_start", "mid_apply"])
def test_a_state_exported_in_the_middle_of_a_boundary_gives_a_joiner_the_same_run(monkeypatch, moment):
    """A donor serves its state from the swarm's thread while its training thread is inside
    an outer-step boundary: after it started round t + P (one more round in flight), or in
    the middle of applying round t (removed from the rounds in flight, θ not stepped yet). Both
    are consistent: the joiner fetches rounds s .. s + min(P, in flight) − 1, numbers its own
    rounds like the others and ends with the same state."""
    from dilo import codec_kernels
    from dilo.in_flight import RoundsInFlight

    ledger = Ledger()
    first, model, opt = make(ledger, "eager")
    taken = {}
    start, all_finite = RoundsInFlight.start, codec_kernels.all_finite

    def take():
        if "state" not in taken and first.inner_step >= 26:  # mid-run (a round starts at 26, τ = 1)
            taken["state"] = first.export_state()

    def start_then_take(self, *args, **kwargs):
        start(self, *args, **kwargs)
        if moment == "after_start" and self is first.in_flight:
            take()

    def take_then_check(x):
        if moment == "mid_apply":
            take()
        return all_finite(x)

    monkeypatch.setattr(RoundsInFlight, "start", start_then_take)
    monkeypatch.setattr(codec_kernels, "all_finite", take_then_check)
    run(first, model, opt, 0, 0, STEPS)
    monkeypatch.undo()
    state = taken["state"]
    assert state.in_flight == (3 if moment == "after_start" else 2)  # P = 2 in flight between boundaries
    joiner, model2, opt2 = make(ledger, "eager", join=state)
    run(joiner, model2, opt2, 1, joiner.inner_step, STEPS)
    assert ledger.fetched == [state.outer_step, state.outer_step + 1]
    assert joiner.outer_step == first.outer_step and joiner.global_hash() == first.global_hash()


@pytest.mark.parametrize("delay", [0, 1])
def test_a_state_adopted_at_the_end_without_overlap_ends_on_the_swarms_final_state(delay):
    """Without overlap (no results are cached, a member runs every round it can itself), a
    member that falls behind in the last regular round adopts a state a donor exported during
    its final drain: outer step N − 1 with the drain round still in flight. The member has no
    progress left to send, so it runs no round of its own; it must still take that round
    (its result, or the newer state) and end on outer step N with everyone's hash, not one
    short (seen once as a flaky tests/test_swarm.py::
    test_streaming_swarm_with_fp4_and_error_feedback_admits_a_joiner: the joiner ended on
    another hash)."""
    ledger = Ledger()
    ledger.states = {}

    def make_none(group):
        model = Net()
        opt = adamw(model)
        return DiLoCo(model, opt, inner_steps=H, group=group, codec="int8", fragments=2, overlap="none",
                      delay=delay, outer_momentum=0.5), model, opt

    first, model, opt = make_none(FakeSwarm(ledger))
    first.group.confirm = lambda outer_step, digest: (FakeSwarm.confirm(first.group, outer_step, digest),
                                                       ledger.states.setdefault(outer_step, first.export_state()))[0]
    run(first, model, opt, 0, 0, STEPS)
    final = first.outer_step
    assert final == STEPS * 2 // H + 1  # the drain sends fragment 1's last steps as round N − 1
    exported = ledger.states[final - 1]
    newer = GlobalState(exported.outer_step, exported.tensors, in_flight=1)  # the drain round in flight
    # the last regular round went on without this member
    late, model2, opt2 = make_none(Behind(ledger, final - 2, newer))
    synced = train_to_the_end(late, model2, opt2, delay=delay)
    assert any(s.adopted and s.outer_step == final - 1 for s in synced)
    assert ledger.fetched == [final - 1]  # the drain round's result, taken instead of run
    assert late.outer_step == final and late.global_hash() == first.global_hash()
