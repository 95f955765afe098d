"""An in-process backend: members are threads of one process (tests, research).

`local_groups(n)` returns n groups that share a rendezvous; give one to each thread.
The byte collectives are the same two-phase exchange the network backends use.
"""

from __future__ import annotations

import threading

import torch

from dilo.aggregate import Aggregate
from dilo.codecs import Codec
from dilo.comm.gather import gather_average
from dilo.comm.protocol import ExchangeResult, Group, RoundId, RoundReport
from dilo.comm.two_phase import two_phase_average


class _Rendezvous:
    def __init__(self, size: int, timeout_s: float):
        self.size = size
        self.timeout_s = timeout_s
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)

    def exchange(self, rank: int, value: object) -> list:
        """Every member's value, in member order. Raises BrokenBarrierError on timeout."""
        self.slots[rank] = value
        self.barrier.wait(self.timeout_s)
        values = list(self.slots)
        self.barrier.wait(self.timeout_s)  # nobody overwrites a slot before all have read
        return values


class LocalGroup(Group):
    def __init__(self, rendezvous: _Rendezvous, rank: int, pieces: int = 1):
        self._rv = rendezvous
        self.rank, self.pieces = rank, pieces
        self.size = rendezvous.size

    def _all_to_all(self, buf: torch.Tensor) -> torch.Tensor:
        # A copy: peers read it after this member has returned (and may reuse `buf`).
        slices = self._rv.exchange(self.rank, buf.view(self.size, -1).clone())
        return torch.cat([s[self.rank] for s in slices])

    def _all_gather(self, buf: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._rv.exchange(self.rank, buf.clone()))

    encoded_average = True  # (only the two-phase exchange keeps the bytes; each result owns them)

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False, keep_encoded: bool = False) -> ExchangeResult:
        if codec.exchange == "gather":  # no round reports: token weighting is refused with it (config)
            return gather_average(flat, codec, self.rank, self.size, self._all_gather,
                                  aggregate=aggregate or self.aggregate, owner_error=owner_error)
        return two_phase_average(flat, codec, self.rank, self.size, self._all_to_all, self._all_gather,
                                 aggregate=aggregate or self.aggregate, report=report, owner_error=owner_error,
                                 pieces=self.pieces, keep_encoded=keep_encoded)

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        flat.copy_(self._rv.exchange(self.rank, flat.clone())[src])

    def all_gather_object(self, obj: object) -> list:
        return self._rv.exchange(self.rank, obj)


def local_groups(size: int, timeout_s: float = 60.0, pieces: int = 1) -> list[LocalGroup]:
    """`pieces`: `comm.pieces` of their two-phase exchange (collectives in order, one at a time)."""
    rv = _Rendezvous(size, timeout_s)
    return [LocalGroup(rv, rank, pieces) for rank in range(size)]
