"""The torch.distributed backend: members are the ranks of a process group (torchrun).

Membership is fixed for the life of the process group; elasticity comes from
torchrun restarting the workers, which then resume (see checkpoint.py). The exchange
runs on CPU tensors, so the group must have a CPU-capable backend (gloo, or
`cpu:gloo,cuda:nccl` as `init_default_group` sets up on GPU machines).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dilo.aggregate import Aggregate
from dilo.codecs import Codec
from dilo.comm.gather import gather_average
from dilo.comm.protocol import (DivergenceError, ExchangeBuffers, ExchangeResult, GlobalState, Group, RoundId,
                                RoundReport)
from dilo.comm.two_phase import started, two_phase_average
from dilo.options import EXCHANGE_PIECES, check_pieces

# torch 2.13 renamed all_gather_into_tensor; older releases only have the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""`all_gather_single(out, buf, group=pg)`: every rank's `buf` concatenated into `out`, in rank order."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_default_group(timeout_s: float, use_cuda: bool) -> None:
    """Initialise the default process group from torchrun's environment variables."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


class TorchGroup(Group):
    """All ranks of a torch.distributed process group (the default one if `pg` is None)."""

    def __init__(self, pg: dist.ProcessGroup | None = None, pieces: int = EXCHANGE_PIECES):
        if not dist.is_initialized():
            raise RuntimeError("TorchGroup needs an initialised torch.distributed process group")
        check_pieces(pieces)
        self.pg, self.pieces = pg, pieces
        self.rank = dist.get_rank(pg)
        self.size = dist.get_world_size(pg)
        self._buffers = ExchangeBuffers()  # reused by every exchange: no model-sized allocation per step

    def _all_to_all(self, buf: torch.Tensor) -> torch.Tensor:
        out = self._buffers.get("recv", buf.numel(), buf.dtype)
        dist.all_to_all_single(out, buf, group=self.pg)
        return out

    def _all_gather(self, buf: torch.Tensor) -> torch.Tensor:
        out = self._buffers.get("gathered", buf.numel() * self.size, buf.dtype)
        all_gather_single(out, buf, group=self.pg)
        return out

    def _post_all_to_all(self, buf: torch.Tensor, out: torch.Tensor):
        return started(dist.all_to_all_single(out, buf, group=self.pg, async_op=True), out)

    def _post_all_gather(self, buf: torch.Tensor, out: torch.Tensor):
        return started(all_gather_single(out, buf, group=self.pg, async_op=True), out)

    average_out = True  # (the gather exchange returns its own tensor: `out` is a permission)
    encoded_average = True  # (likewise `keep_encoded`: only the two-phase exchange keeps the bytes)

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                out: torch.Tensor | None = None, owner_error: bool = False,
                keep_encoded: bool = False) -> ExchangeResult:
        if codec.exchange == "gather":  # no round reports: token weighting is refused with it (config)
            return gather_average(flat, codec, self.rank, self.size, self._all_gather, buffers=self._buffers,
                                  aggregate=aggregate or self.aggregate, owner_error=owner_error)
        return two_phase_average(flat, codec, self.rank, self.size, self._all_to_all, self._all_gather,
                                 buffers=self._buffers, aggregate=aggregate or self.aggregate, report=report,
                                 out=out, owner_error=owner_error, pieces=self.pieces,
                                 posts=(self._post_all_to_all, self._post_all_gather), keep_encoded=keep_encoded)

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(flat, src=dist.get_global_rank(self.pg, src) if self.pg else src, group=self.pg)

    def all_gather_object(self, obj: object) -> list:
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        # The step and the digest's bytes in one fixed-size tensor collective (no pickling).
        mine = bytearray(outer_step.to_bytes(8, "little", signed=True) + digest.encode("ascii"))
        size = torch.tensor([len(mine)], dtype=torch.int64)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.pg)
        if int(size) != len(mine):  # a digest of another length: certainly different
            mine += bytes(int(size) - len(mine)) if int(size) > len(mine) else b""
        buf = torch.frombuffer(mine, dtype=torch.uint8)
        out = torch.empty(buf.numel() * self.size, dtype=torch.uint8)
        all_gather_single(out, buf, group=self.pg)
        rows = [bytes(r) for r in out.view(self.size, -1).numpy()]
        if len(set(rows)) != 1:
            found = [(int.from_bytes(r[:8], "little", signed=True), r[8:].rstrip(b"\0").decode("ascii", "replace"))
                     for r in rows]
            raise DivergenceError(f"global state diverged at outer step {outer_step}: {found}")
        return None

    def any_true(self, flag: bool) -> bool:
        # One int on the wire instead of all_gather_object's two pickled collectives.
        value = torch.tensor([int(bool(flag))], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.pg)
        return bool(value.item())

    def close(self) -> None:
        if self.pg is None and dist.is_initialized():
            dist.destroy_process_group()
