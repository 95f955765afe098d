"""When a worker's round ends, what it reports of the round, and the group's progress.

Three ways to end a round (exactly one; docs/uneven.md):

* `outer.inner_steps` H: after H inner steps (DiLoCo's own schedule; `due()` is None);
* `outer.sync_every_seconds` T: **the deadline is agreed without clocks**: a round starts
  on every worker when it is done with the previous outer step (the exchange, which all
  members leave within milliseconds of each other, then the evaluation, checkpoint and
  stop check, which every worker runs alike), and ends T seconds later. A worker takes
  another inner step only if it is expected to finish before the deadline (expected
  duration: a running mean of its own recent steps), so every worker reaches the
  exchange within one of its own steps before the deadline: a fast worker waits at most
  about one of its steps, whatever the others' speed;
* `outer.target_tokens`: a background thread polls the group (one small all-gather of each
  worker's tokens in the round, every `POLL_SECONDS`, on DiLoCo's own group, off the
  training thread); the first poll whose sum reaches the target closes the round on every
  worker (all see the same poll), and each ends it after its current step. The training
  thread starts no collective while a poll may be running: it waits for the poller to
  finish before the exchange.

Every exchange then carries each worker's `RoundReport` (tokens, steps, compute seconds;
dilo/comm/protocol.py). The group's progress is the mean number of inner steps per worker,
summed over the exchanges (`RunTotals.progress`: the same number on every worker, restored
on resume): the inner LR schedule reads the progress at the start of the
round plus the worker's own steps since, and the run ends at the first outer step where the
progress reaches `run.steps` (so a time-based run trains on as many tokens as a run of H
steps, whoever did them).

`run.slowdown` (a testing aid) makes chosen workers sleep after each inner step.
"""

from __future__ import annotations

import threading
import time

from dilo.comm.protocol import Group, RoundReport
from dilo.config import Config
from dilo.config_checks import parse_slowdown
from dilo.stats import RunTotals

POLL_SECONDS = 0.05
"""outer.target_tokens: pause between two polls of the group's tokens (each poll is one
all-gather of a few bytes in a background thread)."""
STEP_MEAN_DECAY = 0.8
"""outer.sync_every_seconds: weight of the past in the running mean of the step duration."""


class Slowdown:
    """`run.slowdown`: this worker sleeps (factor − 1) × each inner step's duration (testing aid)."""

    def __init__(self, spec: str, worker: int | str):
        self.factor = parse_slowdown(spec).get(worker, 1.0) if isinstance(worker, int) else 1.0

    def after_step(self, seconds: float) -> None:
        if self.factor > 1.0:
            time.sleep((self.factor - 1.0) * seconds)


class _TokenPoll(threading.Thread):
    """outer.target_tokens: polls the group's tokens in the round until they reach the target."""

    def __init__(self, group: Group, target: int, tokens):
        super().__init__(name="dilo-token-poll", daemon=True)
        self.group, self.target, self.tokens = group, target, tokens
        self.closed = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while sum(self.group.all_gather_object(self.tokens())) < self.target:
                time.sleep(POLL_SECONDS)
        except BaseException as e:  # (a dead peer: re-raised on the training thread)
            self.error = e
        self.closed.set()


class RoundClock:
    """One worker's round: when it ends (`due`), its report, and the LR schedule's step."""

    def __init__(self, cfg: Config, group: Group | None, totals: RunTotals):
        o = cfg.outer
        self.mode = "time" if o.sync_every_seconds > 0 else "tokens" if o.target_tokens > 0 else "steps"
        self.seconds, self.target, self.run_steps = o.sync_every_seconds, o.target_tokens, cfg.run.steps
        self.group, self.totals = group, totals
        self.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len * cfg.run.worker_size  # the worker's
        # Reports travel with rounds by time or tokens, and with weighting = tokens when a round is
        # one fragment (with outer.fragments > 1 DiLoCo weights each fragment's round by its steps).
        self.reports = self.mode != "steps" or (o.weighting == "tokens" and o.fragments == 1)
        self.step_mean = 0.0
        self.poll: _TokenPoll | None = None
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    @property
    def by_caller(self) -> bool:
        """Rounds end by time or tokens (DiLoCo runs with inner_steps = 0)."""
        return self.mode != "steps"

    def begin(self, first: bool = False) -> None:
        """A round starts: after the previous outer step's boundary work, or at the start of the
        loop (`first`: rounds by time or tokens then wait for every worker, one small all-gather,
        so that start-up differences do not count as a round's time)."""
        if first and self.by_caller and self.group is not None:
            self.group.all_gather_object(None)
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0
        if self.mode == "tokens" and self.group is not None:
            self.poll = _TokenPoll(self.group, self.target, lambda: self.tokens)
            self.poll.start()

    def count(self, seconds: float) -> None:
        """One inner step of `seconds` (its sleep under run.slowdown included) is done."""
        self.steps += 1
        self.tokens += self.tokens_per_step
        self.step_mean = seconds if self.step_mean == 0 else (
            STEP_MEAN_DECAY * self.step_mean + (1 - STEP_MEAN_DECAY) * seconds)

    def due(self) -> bool | None:
        """Whether this inner step ends the round (None: H steps, DiLoCo's schedule decides)."""
        if self.mode == "steps" or self.steps == 0:
            return None if self.mode == "steps" else False
        if self.mode == "time":
            return time.perf_counter() + self.step_mean > self.start + self.seconds
        if not self.poll.closed.is_set():
            return False
        self.poll.join()  # (it has returned: no collective of it can still run)
        if self.poll.error is not None:
            raise RuntimeError(f"polling the group's tokens failed: {self.poll.error}") from self.poll.error
        return True

    def report(self) -> RoundReport | None:
        """This worker's round so far, for the exchange (None when the exchanges carry none)."""
        if not self.reports:
            return None
        return RoundReport(float(self.tokens), float(self.steps), time.perf_counter() - self.start)

    @property
    def progress(self) -> float:
        """The group's mean inner steps per worker at the start of this round."""
        return self.totals.progress

    def lr_step(self, inner_step: int) -> float:
        """The step the LR schedule reads for this worker's next inner step."""
        return inner_step if self.mode == "steps" else self.progress + self.steps

    def finished(self) -> bool:
        """Rounds by time or tokens: the group's progress reached run.steps (0 = never)."""
        return bool(self.run_steps) and self.progress >= self.run_steps
