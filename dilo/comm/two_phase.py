"""The two-phase exchange over two byte collectives (the protocol: dilo/comm/protocol.py's
module docstring): every backend of fixed or open membership runs `two_phase_average`, giving
it its own `all_to_all` and `all_gather`."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from dilo.aggregate import MEAN, Aggregate, codec_limit, exchange_norms, token_weights
from dilo.codecs import Codec
from dilo.comm.protocol import ExchangeBuffers, ExchangeResult, RoundReport, _as_tuple, chunk_numel
from dilo.reduce_kernels import fused_contribution


def two_phase_average(
    flat: torch.Tensor,
    codec: Codec,
    rank: int,
    size: int,
    all_to_all: Callable[[torch.Tensor], torch.Tensor],
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    buffers: ExchangeBuffers | None = None,
    aggregate: Aggregate = MEAN,
    report: RoundReport | None = None,
    out: torch.Tensor | None = None,
    owner_error: bool = False,
) -> ExchangeResult:
    """The exchange described in the module docstring over two byte collectives.

    `all_to_all(buf)` takes `size` equal byte slices (slice j for member j) and returns
    `size` equal slices (slice i from member i); `all_gather(buf)` returns the
    concatenation of every member's `buf` in member order. Both are blocking and must not
    keep `buf` past their return (it is reused from `buffers` by the next exchange).

    Memory: each chunk is encoded straight into its slice of the send buffer and decoded
    straight into the result (only a short last chunk goes through a padded scratch
    chunk); the owner decodes each contribution into one reused chunk. The bytes are the
    same as encoding a zero-padded copy of `flat` chunk by chunk.

    With `report`, each phase-1 slice is the chunk's bytes then the report's 24 bytes.
    `out`: where the average is written (may be `flat`: phase 1 has read it by then).
    `owner_error`: hand back the owner's re-encode loss (`ExchangeResult.owner_error`, a fresh
    chunk); without it the difference behind `codec_error` goes to a reused chunk.
    """
    start = time.perf_counter()
    bufs = buffers if buffers is not None else ExchangeBuffers()
    flat = flat.contiguous()
    numel = flat.numel()
    chunk = chunk_numel(numel, size, codec.block_size)
    nbytes = codec.encoded_nbytes(chunk)
    scratch = bufs.get("chunk", chunk, torch.float32)

    def piece(member: int) -> torch.Tensor:
        """Member's chunk of `flat`, zero-padded in `scratch` when it runs past the end."""
        lo = member * chunk
        if lo + chunk <= numel:
            return flat[lo:lo + chunk]
        scratch.zero_()
        if lo < numel:
            scratch[:numel - lo].copy_(flat[lo:])
        return scratch

    slot = nbytes + (RoundReport.NBYTES if report is not None else 0)  # one phase-1 slice
    if codec.lossless and numel == chunk * size and report is None:  # fp32's encoding is the bytes themselves
        send = flat.view(torch.uint8)
    else:
        send = bufs.get("send", slot * size, torch.uint8)
        for member in range(size):
            codec.encode(piece(member), out=send[member * slot:member * slot + nbytes])
        if report is not None:
            send.view(size, slot)[:, nbytes:] = _report_bytes(report)
    # -- the owner's rule (dilo/aggregate.py; issue 13): clip first gathers every member's norm
    norms = exchange_norms(send.view(size, slot), codec, chunk, all_gather) if aggregate.needs_norms else None
    recv = all_to_all(send).view(size, slot)
    reports = [] if report is None else [_as_tuple(r) for r in map(_report_from, recv[:, nbytes:])]
    weights = token_weights([r[0] for r in reports]) if aggregate.weighting == "tokens" and reports else None
    # Decode the contributions in member order; mean and clip add each one as it comes, so
    # they reuse one chunk; the sorting rules keep the chunk's valid contributions together.
    # fp32's contributions are their received bytes; int8 and fp4 are screened and summed
    # straight from their bytes (dilo/reduce_kernels.py); the sum is a reused chunk.
    if aggregate.name in ("mean", "clip") and codec.lossless and codec.name == "fp32":
        def decode(member: int) -> torch.Tensor:
            return recv[member, :nbytes].view(torch.float32)
    elif aggregate.name in ("mean", "clip"):
        def decode(member: int) -> torch.Tensor:
            return codec.decode(recv[member, :nbytes], chunk, out=scratch)
    else:
        def decode(member: int) -> torch.Tensor:
            return codec.decode(recv[member, :nbytes], chunk)
    kernels = fused_contribution(codec)
    fused = None if kernels is None else (*kernels, lambda member: recv[member, :nbytes])
    mean, screened = aggregate.reduce(decode, size, chunk, codec_limit(codec), norms, weights,
                                      total=bufs.get("sum", chunk, torch.float32), fused=fused)
    accepted = len(screened.accepted)
    # -- end of the owner's rule
    encoded = codec.encode(mean, out=bufs.get("encoded", nbytes, torch.uint8))

    gathered = all_gather(encoded).view(size, nbytes)
    # int8/fp4: the average is finite exactly when every block scale of its real elements is
    # (and no int8 product overflows): read off the bytes instead of a pass over the result.
    finite = None if kernels is None else all(
        kernels[0](gathered[m], chunk, min(chunk, numel - m * chunk)) for m in range(size) if m * chunk < numel)
    average = torch.empty(numel, dtype=torch.float32) if out is None else _check_out(out, numel)
    codec_error, loss = 0.0, None
    for member in range(size):
        lo = member * chunk
        whole = lo + chunk <= numel
        dst = codec.decode(gathered[member], chunk, out=average[lo:lo + chunk] if whole else scratch)
        if not whole and lo < numel:
            average[lo:].copy_(dst[:numel - lo])
        if member == rank:  # the owner's own bytes decoded: its codec error, no extra decode
            norm = mean.norm().item()
            # mean − dst is the owner error a lossy codec hands back when asked (fresh: results
            # outlive the exchange); else it goes to a reused chunk. ‖b − a‖ = ‖a − b‖ bit for bit.
            handed = owner_error and not codec.lossless
            err = torch.sub(mean, dst, out=None if handed else bufs.get("error", chunk, torch.float32))
            codec_error = err.norm().item() / norm if norm > 0 else 0.0
            if handed and lo < numel:
                loss = (lo, err[:min(chunk, numel - lo)])
    # Counted from the buffers themselves: what leaves for other members in each phase
    # (a member's own slice never touches the wire), and symmetrically what arrives.
    sent = (send.numel() - slot) + encoded.numel() * (size - 1)
    received = (recv.numel() - slot) + (gathered.numel() - encoded.numel())
    if norms is not None:  # clip's one fp32 per member
        sent, received = sent + 4 * (size - 1), received + 4 * (size - 1)
    return ExchangeResult(average, sent, received, size, time.perf_counter() - start,
                          dropped=size - accepted, codec_error=codec_error, owner_error=loss,
                          rejected=screened.rejected,
                          clipped=[(m, c) for m, c in enumerate(screened.factors) if c < 1.0], reports=reports,
                          finite=finite)


def _check_out(out: torch.Tensor, numel: int) -> torch.Tensor:
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != numel:
        raise ValueError(f"out= must be a contiguous fp32 CPU tensor of {numel} elements, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out.view(-1)


def _report_bytes(report: RoundReport) -> torch.Tensor:
    return torch.tensor([report.tokens, report.steps, report.ready_seconds], dtype=torch.float64).view(torch.uint8)


def _report_from(raw: torch.Tensor) -> RoundReport:
    return RoundReport(*raw.clone().view(torch.float64).tolist())
