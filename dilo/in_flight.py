"""The exchanges in flight: rounds started but not applied, their jobs, adoption's supersede.

A `Round` is one fragment's exchange from its snapshot until it is applied. DiLoCo
starts rounds and applies them (dilo/diloco.py); `RoundsInFlight` holds them in the
order they started, runs their jobs (on the exchange thread of dilo/overlap.py when
exchanges overlap compute, else inline), queues the hash checks behind them, and turns
finished rounds into checkpointable tensors and back (`round_state`, `round_from_state`).

Groups with open membership (the hivemind swarm, `Group.open_membership`) have no fixed
ranks: the starting state comes from `Group.bind` (a running swarm's, or ours), a member
that fell behind adopts the group's newer state (`ExchangeResult.adopted`), and
`Group.confirm` may hand back the majority's state after a mismatch. A swarm matches
exchanges by a `RoundId` (the exchange's number and the digest of the state it was taken
from), not by call order, so its confirm runs on the training thread even when exchanges
run in the background. Exchanges are numbered in the order they start: exchange t is
applied as outer step t + 1, so a member at outer step s has started s + len(in flight)
of them. With overlap delayed/eager P of them are in flight at every apply step: a
member that adopts state s (joining, or after a fault) is handed rounds s .. s + P − 1
as results fetched from the members that ran them (`Group.round_result`, `fetch`),
applied on schedule, and takes part from round s + P on. An adopted state supersedes the
exchanges started from the old one: they are skipped (or their results discarded) and
never applied (`supersede`).

Threading hazard: the supersede counters are written by two threads. Jobs carry the
generation they were started in (`_generation`, written by the training thread only);
the exchange thread skips those of a generation <= `_superseded`. The training thread
raises `_superseded` when it adopts a state (`supersede`); the exchange thread raises it
when a job hands back a state itself, so that the later jobs of the same generation are
skipped before they reach the wire. A job reads `_superseded` once, before it starts: a
state adopted while it runs does not stop it, and its result is discarded (its round is
no longer held). The two writes are a read-then-write each, not locked together; if they
race, the value written last may be the smaller one, and then a job of a superseded
generation runs instead of being skipped — wasted work whose result is likewise
discarded, never applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch

from dilo.comm.protocol import DivergenceError, ExchangeResult, GlobalState, Group
from dilo.fragments import Schedule
from dilo.overlap import ExchangeRunner, Handle, run_inline


@dataclass(eq=False)
class Round:
    """One exchange of one fragment, from its snapshot until it is applied."""

    fragment: int
    started: int
    """Inner step at which its pseudo-gradient was taken (it is applied `delay` steps later)."""
    handle: Handle
    """Its job's outcome: (ExchangeResult, mean buffers or None, seconds), or None if superseded."""
    sent: torch.Tensor | None
    """What this worker contributed (Δ_m, plus the residual with error feedback); None for a
    round fetched after an adoption (this worker sent nothing)."""
    pseudo_grad_norm: float


# Checkpoint keys that differ from the ExchangeResult field they hold (older checkpoints
# use these names, so they stay), and the field a finished round does not keep: a state
# handed back is adopted before a checkpoint is written (`DiLoCo.settle`). A field added
# to ExchangeResult is saved; checkpoints without it load its default.
_RESULT_KEYS = {"seconds": "exchange_seconds"}
_NOT_SAVED = ("adopted", "rejected", "clipped", "finite", "encoded")
"""(logged when it ran; finite: checked again; encoded: views of the group's buffer, decoded first)"""


def round_state(rnd: Round) -> dict:
    """A finished round as plain tensors and numbers (for checkpoints)."""
    result, mean_buffers, seconds = rnd.handle.result()
    result.decoded_average()  # (an average kept in its bytes is saved decoded)
    state = {f.name: getattr(rnd, f.name) for f in fields(Round) if f.name != "handle"}
    state.update({_RESULT_KEYS.get(f.name, f.name): getattr(result, f.name)
                  for f in fields(ExchangeResult) if f.name not in _NOT_SAVED})
    state.update(buffers=mean_buffers, seconds=seconds, exposed=rnd.handle.exposed_seconds)
    return state


def round_from_state(s: dict) -> Round:
    keys = {f.name: _RESULT_KEYS.get(f.name, f.name) for f in fields(ExchangeResult)}
    result = ExchangeResult(**{name: s[key] for name, key in keys.items() if key in s})
    handle = run_inline(lambda: (result, s["buffers"], s["seconds"]))
    handle.exposed_seconds = s["exposed"]
    return Round(**{f.name: s[f.name] for f in fields(Round) if f.name != "handle"}, handle=handle)


class RoundsInFlight:
    """The rounds a worker started and has not applied, in the order they started, and the
    jobs that run them (see the module docstring for the supersede rule)."""

    def __init__(self, group: Group, background: bool):
        self.group = group
        self.rounds: list[Round] = []
        self._runner = ExchangeRunner() if background else None
        self._hash_checks: list[tuple[tuple[int, str], Handle]] = []
        self._generation = 0
        self._superseded = -1
        self.owed_until = 0
        """Exchanges numbered below this were in flight at the last adopted state: a member
        that ran none of its own after them (it adopted at the end of the run) takes them
        with `fetch_owed`."""

    def __len__(self) -> int:
        return len(self.rounds)

    def __iter__(self) -> Iterator[Round]:
        return iter(list(self.rounds))

    def start(self, fragment: int, started: int, exchange: Callable[[], tuple], sent: torch.Tensor,
              pseudo_grad_norm: float) -> None:
        """Run `exchange` (returns (ExchangeResult, mean buffers or None)) as a new round."""
        job = self._job(exchange)
        handle = self._runner.submit(job) if self._runner else run_inline(job)
        self.rounds.append(Round(fragment, started, handle, sent, pseudo_grad_norm))

    def remove(self, rnd: Round) -> None:
        self.rounds = [r for r in self.rounds if r is not rnd]

    def supersede(self) -> None:
        """An adopted state replaces the one every round in flight started from: their jobs
        are skipped if they have not run, their results never applied."""
        self._superseded = max(self._superseded, self._generation)
        self._generation += 1
        self.rounds = []

    def restart_from(self, outer_step: int, in_flight: int, schedule: Schedule) -> int:
        """After adopting a state at `outer_step` (whose holder had `in_flight` exchanges
        started): supersede every round, fetch the n = min(P, in_flight) rounds in flight at
        that state (P, except at the start and the end of the run); returns n."""
        self.supersede()
        self.owed_until = outer_step + in_flight
        missed = min(schedule.round_lag, in_flight)
        for number in range(outer_step, outer_step + missed):
            self.fetch(number, *schedule.missed_round(number))
        return missed

    def fetch(self, number: int, fragment: int, started: int) -> None:
        """Add exchange `number`, which this worker missed (it was in flight when the worker
        adopted a state): its result comes from the members that ran it, on the exchange
        thread, in order."""
        job = self._job(lambda: (self.group.round_result(number), None))
        handle = self._runner.submit(job) if self._runner else run_inline(job)
        self.rounds.append(Round(fragment, started, handle, None, 0.0))

    def fetch_owed(self, outer_step: int, schedule: Schedule) -> int:
        """At the end of the run, after the drain: fetch the exchanges from `outer_step` (the
        member's, rounds in flight counted) to `owed_until` − 1, which a donor had in flight
        when it exported the state this member adopted last, and which this member neither
        fetched nor ran itself (it had no progress left to send); returns how many. Without
        them the member would end outer steps short of the others, on another state."""
        owed = range(outer_step + len(self.rounds), self.owed_until)
        for number in owed:
            self.fetch(number, *schedule.missed_round(number))
        return len(owed)

    def _job(self, call: Callable[[], tuple]) -> Callable[[], tuple | None]:
        """`call` (an exchange: (result, mean buffers)) as a job of the current generation,
        timed: skipped (None) once a state adopted since supersedes it; if it hands back a
        state itself, the later jobs of its generation are superseded."""
        generation = self._generation

        def job():
            if self._superseded >= generation:
                return None
            start = time.perf_counter()
            result, mean_buffers = call()
            if result.adopted is not None:
                self._superseded = max(self._superseded, generation)
            return result, mean_buffers, time.perf_counter() - start

        return job

    def wait(self) -> None:
        """Block until every round's job has run."""
        for rnd in list(self.rounds):
            rnd.handle.result()

    def adopting_round(self) -> Round | None:
        """The first finished round whose exchange handed back a newer state, if any."""
        for rnd in self.rounds:
            if rnd.handle.done():
                outcome = rnd.handle.result()
                if outcome is not None and outcome[0].adopted is not None:
                    return rnd
        return None

    # -- replicas must agree -----------------------------------------------------------
    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        """`Group.confirm` of an outer step's digest; the majority's state if it differs.

        With exchanges in the background the check is a collective too: it queues behind
        them on the exchange thread (see dilo/overlap.py) and its outcome is collected at a
        later step (`collect_hash_checks`). Open-membership groups confirm inline (by digest,
        not call order) and may hand back a state to adopt.
        """
        if self._runner is not None and not self.group.open_membership:
            check = self._runner.submit(lambda: self.group.confirm(outer_step, digest))
            self._hash_checks.append(((outer_step, digest), check))
            return None
        return self.group.confirm(outer_step, digest)

    def collect_hash_checks(self, block: bool) -> None:
        """Raise DivergenceError for a queued check that failed (only the finished ones
        unless `block`)."""
        while self._hash_checks and (block or self._hash_checks[0][1].done()):
            (step, digest), handle = self._hash_checks.pop(0)
            if handle.result() is not None:  # only open-membership groups repair, and they confirm inline
                raise DivergenceError(f"global state diverged at outer step {step} ({digest[:12]})")

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> list[dict]:
        """Every round, finished (waits for them), as plain tensors and numbers."""
        return [round_state(r) for r in self.rounds]

    def load_state(self, saved: list[dict]) -> None:
        self.rounds = [round_from_state(r) for r in saved]

    def close(self) -> None:
        """Stop the exchange thread (a hung collective is not waited for)."""
        if self._runner is not None:
            self._runner.close()
