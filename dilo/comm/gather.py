"""The gather exchange: every member decodes every member's bytes (codecs with ``exchange = "gather"``).

The sparse codec (dilo/codec_lowbit.py) cannot take the two-phase exchange of
dilo/comm/protocol.py as it is: an owner's mean of M contributions that each keep a
fraction d of a block holds up to M·d nonzeros, and re-sparsifying it to d would lose
what the workers' error feedback already counted as sent. So instead:

1. each member encodes its whole vector once (exactly what its error feedback assumed);
2. one all-gather: every member holds every member's bytes, in member order;
3. every member decodes the contributions and reduces them with the group's rule
   (`outer.aggregate`, dilo/aggregate.py), chunk by chunk, in member order.

Every member runs the same deterministic decoder and the same reduction on the same
bytes, so the average is bit-identical everywhere, as with the two-phase exchange. The
average is the exact mean of the decoded contributions: no owner re-encodes anything
(`codec_error` is 0). Bytes: each member sends its S bytes to M − 1 others and receives
(M − 1)·S, against 2·(M − 1)/M·S' for the two-phase exchange of a dense codec of S'
bytes: the gather grows with M, the two-phase does not (docs/codecs.md has the numbers).

The chunks are those of the two-phase exchange (one per member, whole codec blocks), and
member r reports the screening of chunk r (`dropped`, `rejected`), so a group's counts
mean the same with either exchange. clip's norms come from the gathered bytes themselves
(no extra collective): a member cannot report a norm other than the one it sent.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from dilo.aggregate import MEAN, Aggregate, codec_limit
from dilo.codecs import Codec
from dilo.comm.protocol import ExchangeBuffers, ExchangeResult, chunk_numel, nothing_lost


def gather_average(
    flat: torch.Tensor,
    codec: Codec,
    rank: int,
    size: int,
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    buffers: ExchangeBuffers | None = None,
    aggregate: Aggregate = MEAN,
    owner_error: bool = False,
) -> ExchangeResult:
    """The exchange in the module docstring over one byte collective.

    `all_gather(buf)` returns the concatenation of every member's `buf` in member order (it
    must not keep `buf`: it is reused by the next exchange). The codec must offer
    `decode_range(buf, numel, lo, hi, out=)` (elements [lo, hi) of its decode).
    `owner_error` (`Group.average`): no owner re-encodes anything, so `nothing_lost()`.
    """
    start = time.perf_counter()
    bufs = buffers if buffers is not None else ExchangeBuffers()
    flat = flat.contiguous()
    numel = flat.numel()
    nbytes = codec.encoded_nbytes(numel)
    encoded = codec.encode(flat, out=bufs.get("encoded", nbytes, torch.uint8))
    gathered = all_gather(encoded).view(size, nbytes)
    chunk = chunk_numel(numel, size, codec.block_size)
    scratch = bufs.get("chunk", chunk, torch.float32)
    norms = None
    if aggregate.needs_norms:  # clip: the norm of what each member sent, from its bytes
        norms = []
        for member in range(size):
            square = sum(codec.decode_range(gathered[member], numel, lo, min(lo + chunk, numel),
                                            out=scratch[:min(chunk, numel - lo)]).double().square().sum().item()
                         for lo in range(0, numel, chunk))
            norms.append(float(torch.tensor([square ** 0.5], dtype=torch.float32)))
    average = torch.empty(numel, dtype=torch.float32)
    own = None
    for j, lo in enumerate(range(0, numel, chunk)):
        hi = min(lo + chunk, numel)
        if aggregate.name in ("mean", "clip"):  # summed one at a time: one reused chunk
            def decode(member: int, lo=lo, hi=hi) -> torch.Tensor:
                return codec.decode_range(gathered[member], numel, lo, hi, out=scratch[:hi - lo])
        else:  # the sorting rules hold the chunk's contributions together
            def decode(member: int, lo=lo, hi=hi) -> torch.Tensor:
                return codec.decode_range(gathered[member], numel, lo, hi)
        part, screened = aggregate.reduce(decode, size, hi - lo, codec_limit(codec), norms)
        average[lo:hi] = part
        if j == rank:
            own = screened
    wire = nbytes * (size - 1)  # a member's own bytes never touch the wire
    factors = aggregate.clip_factors(norms) if norms is not None else []
    return ExchangeResult(average, wire, wire, size, time.perf_counter() - start,
                          dropped=len(own.rejected) if own else 0, rejected=own.rejected if own else [],
                          clipped=[(m, c) for m, c in enumerate(factors) if c < 1.0],
                          owner_error=nothing_lost() if owner_error else None)
