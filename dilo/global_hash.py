"""The global hash: a digest of θ, the outer momentum and the outer step, compared by every
member after every outer step (`GlobalHash`, a part of `OuterState`), and the thread that
computes it while the next inner steps run (`outer.digest = background`, `BackgroundDigest`).

With `outer.digest = step` (the default) the outer step hashes the new state (BLAKE3 over
8 bytes per parameter: a fifth to a quarter of the step's CPU at 100M parameters,
docs/results.md) and confirms the digest with the group before it returns. With
`background` the step hands the new state to a digest thread and returns; the digest of
state t is confirmed with the group at outer step t + 1 (or when the run flushes), so every
state is still compared on every member, one step later. θ and the momentum change only at
outer steps, so the thread hashes exactly state t while the inner steps train the live model.

The thread holds the state lock (`OuterState._state_lock`) from the moment the step hands it
the state until the digest is done: the lock is taken on the training thread, before the job
is queued, and released by the job. Whatever changes θ or the momentum takes that lock first,
so it waits for the digest instead of changing the bytes under it. BLAKE3 releases the GIL
while it hashes, so the inner steps go on meanwhile; where the inner steps keep every core
busy (CPU training), the hash takes its CPU from them (docs/results.md measures both).

Only fixed groups run it (torchrun with `run.failover = restart`): an open swarm confirms each
state when it is made, because a peer that differs adopts the majority's state there, and a
healing group changes members between steps.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dilo.comm.protocol import state_digest
from dilo.options import check_digest

log = logging.getLogger("dilo")


@dataclass
class PendingDigest:
    """The digest of the state at `outer_step`, being computed or done; `confirmed` once the
    group has compared it."""

    outer_step: int
    local: Future
    """This process's digest (`state_digest` of its θ and momentum views)."""
    confirmed: bool = False


class BackgroundDigest:
    """One digest thread and the last state handed to it."""

    def __init__(self, state_lock: threading.Lock):
        self._lock = state_lock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dilo-digest")
        self.pending: PendingDigest | None = None

    def start(self, views: list[torch.Tensor], outer_step: int) -> PendingDigest | None:
        """Hash `views` (the state at `outer_step`) on the digest thread; returns the digest
        handed over before, which the caller confirms (None at the first step)."""
        previous = self.pending
        self._lock.acquire()  # released by the job: nothing changes θ before it has hashed it
        try:
            future = self._pool.submit(self._hash, views, outer_step)
        except BaseException:
            self._lock.release()
            raise
        self.pending = PendingDigest(outer_step, future)
        return previous

    def _hash(self, views: list[torch.Tensor], outer_step: int) -> str:
        try:
            return state_digest(views, outer_step)
        finally:
            self._lock.release()

    def local_for(self, outer_step: int) -> str | None:
        """This process's digest of the state at `outer_step` if it is the one handed over
        (waits for it), else None."""
        if self.pending is None or self.pending.outer_step != outer_step:
            return None
        return self.pending.local.result()

    def unconfirmed(self) -> PendingDigest | None:
        """The last digest handed over, if the group has not compared it yet."""
        return self.pending if self.pending is not None and not self.pending.confirmed else None

    def forget(self) -> None:
        """The state is about to be replaced (a checkpoint or another run's weights load): wait
        for the thread, then drop its digest. Fixed groups load only before their first outer
        step, so no digest the group still expects to compare is dropped."""
        if self.pending is not None:
            self.pending.local.result()
            self.pending = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class GlobalHash:
    """The global hash of an `OuterState` (θ, outer momentum, outer step) and its confirmation
    with the group after every outer step: at the step, or on the digest thread and one step
    later (`BackgroundDigest`)."""

    def global_hash(self) -> str:
        """Hex digest over θ, the outer momentum (both in model order) and the outer step
        (the background thread's, when it hashed this state)."""
        local = self.background_digest.local_for(self.outer_step) if self.background_digest else None
        return self._whole_digest(local if local is not None else self._local_digest())

    def _local_digest(self) -> str:
        """This process's digest of its θ and momentum (no collective: any thread may run it)."""
        return state_digest(self.global_copy.digest_views(), self.outer_step)

    def _whole_digest(self, local: str) -> str:
        """The global hash from this process's `_local_digest` (a sharded worker gathers its ranks')."""
        return local

    def _digest(self) -> str:
        """`global_hash()` of the current state, computed once per state."""
        if self._known_digest is None or self._known_digest[0] != self.outer_step:
            self._known_digest = (self.outer_step, self.global_hash())
        return self._known_digest[1]

    def _confirmed_digest(self, check: bool) -> tuple[str, int, bool]:
        """The new state's digest, confirmed with the group when `check` (dilo/in_flight.py):
        (digest, the outer step it is of, True if the majority's state was adopted). A fixed
        group raises DivergenceError on a mismatch. With outer.digest = background the new
        state goes to the digest thread and the previous state's digest is confirmed instead
        ("", -1 at the first step)."""
        if self.background_digest is not None:
            previous = self.background_digest.start(self.global_copy.digest_views(), self.outer_step)
            if previous is None:
                return "", -1, False
            return self._confirm_pending(previous, check), previous.outer_step, False
        digest = self.global_hash()
        self._known_digest = (self.outer_step, digest)
        if not check:  # (a one-worker island still compares its ranks: no size shortcut)
            return digest, self.outer_step, False
        repaired = self.in_flight.confirm(self.outer_step, digest)
        if repaired is None:
            return digest, self.outer_step, False
        log.warning("outer step %d: this worker's global state differs from the group's majority; "
                    "adopting the majority's state", self.outer_step)
        self.adopt_state(repaired)
        return self._digest(), self.outer_step, True

    def _confirm_pending(self, pending, check: bool) -> str:
        """Confirm a digest the background thread computed (fixed groups: the check raises)."""
        digest = self._whole_digest(pending.local.result())
        if check:
            self.in_flight.confirm(pending.outer_step, digest)
        pending.confirmed = True
        return digest

    def settle_digest(self, check: bool) -> None:
        """outer.digest = background: confirm the last state's digest when `check` (the end of
        a run; every member calls it, as `flush()` does)."""
        pending = self.background_digest.unconfirmed() if self.background_digest else None
        if pending is not None:
            self._confirm_pending(pending, check)

    def _forget_digest(self) -> None:
        """Before the state is replaced: the digest thread finishes (it holds the state lock)."""
        if self.background_digest is not None:
            self.background_digest.forget()


def digest_thread(mode: str, open_membership: bool, state_lock: threading.Lock) -> BackgroundDigest | None:
    """The digest thread `outer.digest` asks for (None: hash at the step); refuses what cannot run it."""
    check_digest(mode)
    if mode == "step":
        return None
    if open_membership:
        raise ValueError("outer.digest = background needs a group of fixed members (comm.backend = torch): "
                         "a swarm confirms every state at its step, where a peer that differs adopts the "
                         "majority's state; use outer.digest = step")
    return BackgroundDigest(state_lock)
