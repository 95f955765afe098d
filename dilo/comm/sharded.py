"""The group of a sharded worker (`run.shard = fsdp`, dilo/sharded_state.py).

Each rank of the worker holds its own chunk of θ; local rank r averages its chunk with
local rank r of every other worker through its `inter` group (the islands' slice group,
dilo/comm/hierarchical.py) and keeps the result: no gather inside the worker afterwards,
since no rank needs the other chunks. `rank`/`size` are the workers', `all_gather_object`
and `confirm` cover every process (worker-major), as `HierarchicalGroup`'s sliced mode.
"""

from __future__ import annotations

import time

import torch

from dilo.aggregate import Aggregate
from dilo.codecs import Codec
from dilo.comm.hierarchical import HierarchicalGroup
from dilo.comm.protocol import ExchangeResult, RoundId, RoundReport


class ShardedGroup(HierarchicalGroup):
    """Local rank r of every worker averages chunk r (see module doc); a fixed group only."""

    def __init__(self, inter, intra_pg):
        super().__init__(inter, intra_pg, sliced=True)
        if self.open_membership:
            raise ValueError("run.shard = fsdp needs a fixed group of workers (comm.backend = torch)")
        self.average_out = inter.average_out

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                out: torch.Tensor | None = None, owner_error: bool = False) -> ExchangeResult:
        start = time.perf_counter()
        named = {"out": out} if out is not None else {}
        res = self.inter.average(flat, codec, round, aggregate, report, owner_error=owner_error, **named)
        res.seconds = time.perf_counter() - start
        return res

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        """Overwrite this rank's chunk with local rank r's chunk of worker `src`."""
        self.inter.broadcast(flat, src=src)
