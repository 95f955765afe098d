"""Running the outer exchange while the worker computes: one background thread per worker.

`ExchangeRunner` owns a single daemon thread and a FIFO queue. Every collective that
DiLoCo issues while exchanges may be in flight (pseudo-gradient averages, buffer
averages, the hash comparison) is submitted here and runs on that thread, one at a
time, in submission order. `run_inline` is the blocking twin used when nothing
overlaps (`outer.delay = 0`, `outer.overlap = none`): the same jobs, on the caller's
thread, so the classic algorithm runs exactly as before. The rounds these jobs belong to
are dilo/in_flight.py.

Distributed hazards, and why this is safe:

* Collectives on one process group must be issued in the same order on every member,
  and two threads of one process must never interleave collectives on the same group
  (with gloo the n-th call of each member is matched with the n-th call of every other
  member; an interleaving that differs between members pairs the wrong buffers, or
  hangs). DiLoCo submits jobs at points fixed by the inner-step counter (the fragment
  schedule), identical on every member, and this one thread runs them in that order:
  the order of collectives is the same everywhere and nothing interleaves. We chose
  to serialize rather than to give each kind of collective its own process group.
* The training loop must not issue its own collectives on the group DiLoCo uses while
  work is in flight. The trainer therefore hands DiLoCo a dedicated process group
  (`dist.new_group`, created by every rank at the same point of start-up), so the
  default group stays free for anything else (resume, DDP baselines, user code).
* A job only reads tensors made for it (the pseudo-gradient snapshot) and returns new
  ones; the training thread never touches them until it waits for the result. θ,
  the outer momentum and the model are only changed by the training thread.
* The thread is a daemon: if a peer dies mid-collective the job fails after the
  backend's timeout and the error is raised in the training thread at its next wait;
  a worker that exits while a collective hangs is not kept alive by it.
* The in-process threads backend (`dilo/comm/local.py`) is indifferent to which thread
  calls it, as long as each member makes one call at a time, which this guarantees.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable


class Handle:
    """A job's result plus how long the training thread was stalled waiting for it."""

    def __init__(self, future: Future):
        self._future = future
        self.exposed_seconds = 0.0
        """Wall time callers of `result()` spent blocked on this job (its exposed cost)."""

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Any:
        """Block until the job has run; re-raise its exception here if it failed."""
        if not self._future.done():
            start = time.perf_counter()
            try:
                return self._future.result()
            finally:
                self.exposed_seconds += time.perf_counter() - start
        return self._future.result()


def run_inline(job: Callable[[], Any]) -> Handle:
    """Run `job` now on this thread; all of its time counts as exposed."""
    future: Future = Future()
    start = time.perf_counter()
    try:
        future.set_result(job())
    except BaseException as e:  # noqa: BLE001 - re-raised by result()
        future.set_exception(e)
    handle = Handle(future)
    handle.exposed_seconds = time.perf_counter() - start
    return handle


class ExchangeRunner:
    """One worker thread running submitted jobs in FIFO order (see the module docstring)."""

    def __init__(self, name: str = "dilo-exchange"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> Handle:
        if self._closed:
            raise RuntimeError("ExchangeRunner is closed")
        future: Future = Future()
        self._queue.put((job, future))
        return Handle(future)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # noqa: BLE001 - delivered to the waiting thread
                future.set_exception(e)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued jobs; does not wait longer than `timeout` for a hung one."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
