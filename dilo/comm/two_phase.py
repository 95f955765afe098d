"""The two-phase exchange over two byte collectives, pipelined in pieces.

The protocol is dilo/comm/protocol.py's module docstring. Every backend runs
`two_phase_average` with its own `all_to_all` and `all_gather`; a backend that can start a
collective without waiting for it (torch.distributed's `async_op=True`) also passes `posts`,
and the exchange's local work then runs while its bytes are on the wire.

**Pieces** (`comm.pieces`, K). Each owner chunk is cut into at most K pieces on codec block
boundaries (`piece_bounds`), and each piece is encoded on its own: the same per-block scales
and codes as the whole chunk's encoding, so the same decoded values and the same θ bits for
any K, and the same number of bytes; only their order within a slice changes (each piece's
payload, then its scales). Phase 1 runs one all-to-all per piece: piece j + 1 is encoded
while piece j is on the wire, and the owner sums piece j (and encodes its mean) while piece
j + 1 arrives. Phase 2 starts when all of phase 1 has arrived — a contribution is dropped
whole when any of its pieces is invalid, so an owner that counted an earlier piece of it sums
again before anything leaves (`aggregate.MeanByPieces`) — with one all-gather per piece, all
posted at once, each piece decoded while the next ones are in flight. K = 1 is the exchange
without pieces. Only `outer.aggregate = mean` runs pieces: clip's norms and its check of a
chunk against them need whole chunks, and the sorting rules were not pipelined. The swarm's
exchange (swarm_exchange.py) runs K = 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from dilo import codec_error_sums, codec_kernels
from dilo.aggregate import MEAN, Aggregate, MeanByPieces, codec_limit, exchange_norms, token_weights
from dilo.codecs import Codec
from dilo.comm.protocol import EncodedAverage, ExchangeBuffers, ExchangeResult, RoundReport, _as_tuple, chunk_numel
from dilo.reduce_kernels import fused_contribution

Post = Callable[[torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]
"""`post(buf, out)` starts a collective from `buf` into `out` (which it may use or not) and returns
`wait`: it blocks until the collective is done and returns the received bytes."""


def piece_bounds(chunk: int, codec: Codec, pieces: int) -> list[tuple[int, int]]:
    """(offset, elements) of each piece of an owner chunk of `chunk` elements: at most `pieces`,
    each a whole number of lcm(block size, 8) elements but the last (a codec that packs several
    elements into a byte never splits one); one piece when the pieces' encodings would not add up
    to the chunk's byte count."""
    if pieces <= 1:
        return [(0, chunk)]
    grain = math.lcm(codec.block_size, 8)
    step = -(-math.ceil(chunk / pieces) // grain) * grain
    bounds = [(lo, min(step, chunk - lo)) for lo in range(0, chunk, step)]
    if sum(codec.encoded_nbytes(n) for _, n in bounds) != codec.encoded_nbytes(chunk):
        return [(0, chunk)]
    return bounds


def started(work, out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`wait` of a collective started with `async_op=True` (a torch `Work`) that fills `out`."""
    def wait() -> torch.Tensor:
        work.wait()
        return out
    return wait


def blocking(collective: Callable[[torch.Tensor], torch.Tensor]) -> Post:
    """A `Post` for a blocking collective `collective(buf) -> received`: it runs at once."""
    def post(buf: torch.Tensor, out: torch.Tensor) -> Callable[[], torch.Tensor]:
        got = collective(buf)
        return lambda: got
    return post


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
    pieces: int = 1,
    posts: tuple[Post, Post] | None = None,
    keep_encoded: bool = False,
) -> ExchangeResult:
    """The exchange described in the module docstring over two byte collectives.

    `all_to_all(buf)` takes `size` equal byte slices (slice j for member j) and returns
    `size` equal slices (slice i from member i); `all_gather(buf)` returns the
    concatenation of every member's `buf` in member order. Both are blocking and must not
    keep `buf` past their return (it is reused from `buffers` by the next exchange).
    `posts`: (all-to-all, all-gather) as `Post`s that return before the bytes have moved
    (default: the blocking ones, run at once); every member posts them in the same order.

    Memory: each piece is encoded straight into its slices of the send buffer (which holds
    two pieces' slices: 2/K of a whole send) and decoded straight into the result (only a
    short last chunk goes through a padded scratch chunk); the owner sums the contributions
    into one reused chunk. The bytes are the same as encoding a zero-padded copy of `flat`
    piece by piece.

    With `report`, each phase-1 slice of the first piece is its bytes then the report's 24 bytes.
    `out`: where the average is written (may be `flat`: phase 1 has read it by then).
    `owner_error`: hand back the owner's re-encode loss (`ExchangeResult.owner_error`, a fresh
    chunk: zeros for a lossless codec, empty for a member that owns no element of `flat`);
    without it the difference behind `codec_error` goes to a reused chunk.
    `pieces`: K of the module docstring (`comm.pieces`); the same average for any K.
    `keep_encoded`: with an int8/fp4 one-pass kernel (`reduce_kernels.fused_contribution`),
    leave the gathered average in its bytes (`ExchangeResult.encoded`, `average` not filled;
    `codec_error` is read off the owner's own bytes a tile at a time, dilo/codec_error_sums.py, or
    they are decoded when `owner_error` asks for the difference); they stay in a buffer of
    their own until the next exchange that keeps them. Otherwise ignored.
    """
    start = time.perf_counter()
    bufs = buffers if buffers is not None else ExchangeBuffers()
    flat = flat.contiguous()
    numel = flat.numel()
    chunk = chunk_numel(numel, size, codec.block_size)
    bounds = piece_bounds(chunk, codec, pieces if aggregate.name == "mean" else 1)
    count = len(bounds)
    nbytes = [codec.encoded_nbytes(n) for _, n in bounds]
    extra = RoundReport.NBYTES if report is not None else 0
    slots = [nb + (extra if k == 0 else 0) for k, nb in enumerate(nbytes)]  # one phase-1 slice per piece
    off1 = [size * sum(slots[:k]) for k in range(count + 1)]  # piece k's phase-1 bytes: [off1[k], off1[k+1])
    off2 = [sum(nbytes[:k]) for k in range(count + 1)]  # its encoded mean; gathered: size × that
    post_a2a, post_gather = posts if posts is not None else (blocking(all_to_all), blocking(all_gather))
    scratch = bufs.get("chunk", chunk, torch.float32)

    def source(member: int, lo: int, n: int) -> torch.Tensor:
        """Elements [lo, lo + n) of member's chunk of `flat`, zero-padded in `scratch` past the end."""
        a = member * chunk + lo
        if a + n <= numel:
            return flat[a:a + n]
        pad = scratch[:n].zero_()
        if a < numel:
            pad[:numel - a].copy_(flat[a:])
        return pad

    as_is = codec.lossless and numel == chunk * size and report is None and count == 1
    # (fp32's encoding is the bytes themselves)
    # Two pieces at most are in phase 1's flight (piece k is waited for before piece k + 2 is
    # encoded): their send slices alternate between two halves of one buffer.
    region = size * max(slots)
    send = flat.view(torch.uint8) if as_is else bufs.get("send", region * min(count, 2), torch.uint8)

    def outgoing(k: int) -> torch.Tensor:
        """Piece k's phase-1 bytes (all owners' slices)."""
        if as_is:
            return send[off1[k]:off1[k + 1]]
        return send[(k % 2) * region:(k % 2) * region + off1[k + 1] - off1[k]]
    recv = bufs.get("recv", off1[-1], torch.uint8)

    def encode_piece(k: int) -> torch.Tensor:
        """Piece k's phase-1 slices, one row per owner (encoded unless `send` is `flat` itself)."""
        rows = outgoing(k).view(size, slots[k])
        if not as_is:
            lo, n = bounds[k]
            for member in range(size):
                codec.encode(source(member, lo, n), out=rows[member, :nbytes[k]])
            if extra and k == 0:
                rows[:, nbytes[k]:] = _report_bytes(report)
        return rows

    first = encode_piece(0)
    # -- the owner's rule (dilo/aggregate.py; issue 13): clip first gathers every member's norm
    norms = exchange_norms(first, codec, chunk, all_gather) if aggregate.needs_norms else None
    waits = [post_a2a(outgoing(0), recv[off1[0]:off1[1]])]
    kernels = fused_contribution(codec)
    summed = aggregate.name in ("mean", "clip")
    total = bufs.get("sum", chunk, torch.float32)
    encoded = bufs.get("encoded", off2[-1], torch.uint8)
    reports, pieces_of, means, screened = [], None, [None] * count, None

    def reduce(k: int, got: torch.Tensor) -> None:
        """The owner's result for piece k from its received slices `got`, encoded into `encoded`."""
        nonlocal screened
        lo, n = bounds[k]
        nb = nbytes[k]
        # Decode the contributions in member order; mean and clip add each one as it comes, so
        # they reuse one chunk; the sorting rules keep the chunk's valid contributions together.
        # fp32's contributions are their received bytes; int8 and fp4 are screened and summed
        # straight from their bytes (dilo/reduce_kernels.py); the sum is a reused chunk.
        if summed and codec.lossless and codec.name == "fp32":
            def decode(member: int) -> torch.Tensor:
                return got[member, :nb].view(torch.float32)
        elif summed:
            def decode(member: int) -> torch.Tensor:
                return codec.decode(got[member, :nb], n, out=scratch[:n])
        else:
            def decode(member: int) -> torch.Tensor:
                return codec.decode(got[member, :nb], n)

        def raw(member: int) -> torch.Tensor:
            return got[member, :nb]
        if pieces_of is None:  # one piece: the owner's rule over the whole chunk
            means[k], screened = aggregate.reduce(decode, size, chunk, codec_limit(codec), norms, weights,
                                                  total=total, fused=None if kernels is None else (*kernels, raw))
        else:
            means[k] = pieces_of.piece(lo, n, decode, raw)
        codec.encode(means[k], out=encoded[off2[k]:off2[k + 1]])

    weights, arrived = None, []
    for k in range(count):
        if k + 1 < count:  # piece k + 1 goes on the wire while piece k arrives and is summed
            encode_piece(k + 1)
            waits.append(post_a2a(outgoing(k + 1), recv[off1[k + 1]:off1[k + 2]]))
        got = waits[k]().view(size, slots[k])
        arrived.append(got)
        if k == 0:
            if report is not None:
                reports = [_as_tuple(r) for r in map(_report_from, got[:, nbytes[0]:])]
            if aggregate.weighting == "tokens" and reports:
                weights = token_weights([r[0] for r in reports])
            if count > 1:
                pieces_of = MeanByPieces(size, codec_limit(codec), weights, total, kernels)
        reduce(k, got)
    if pieces_of is not None:
        if pieces_of.redo:  # a contribution counted in an earlier piece was dropped in a later one
            pieces_of.again()
            for k in range(count):
                reduce(k, arrived[k])
        screened = pieces_of.screened()
    accepted = len(screened.accepted)
    # -- end of the owner's rule
    keep = keep_encoded and kernels is not None
    # (kept bytes get a buffer of their own: the fp32 exchange of the model's buffers that
    # follows in the same round reuses "gathered")
    gathered = bufs.get("gathered_average" if keep else "gathered", size * off2[-1], torch.uint8)
    waits = [post_gather(encoded[off2[k]:off2[k + 1]], gathered[size * off2[k]:size * off2[k + 1]])
             for k in range(count)]
    average = torch.empty(numel, dtype=torch.float32) if out is None else _check_out(out, numel)
    # int8/fp4: the average is finite exactly when every block scale of its real elements is
    # (and no int8 product overflows): read off the bytes instead of a pass over the result.
    finite = None if kernels is None else True
    # mean − dst is the owner error handed back when asked (fresh: results outlive the exchange);
    # else it goes to a reused chunk. ‖b − a‖ = ‖a − b‖ bit for bit.
    errors = torch.empty(chunk, dtype=torch.float32) if owner_error else bufs.get("error", chunk, torch.float32)
    mean_sq = error_sq = 0.0  # the owner's ‖mean‖² and ‖mean − dst‖², summed over its pieces
    rows = []  # keep: EncodedAverage's rows
    for k in range(count):
        lo, n = bounds[k]
        got = waits[k]().view(size, nbytes[k])
        for member in range(size):
            a = member * chunk + lo
            if finite and a < numel:
                finite = kernels[0](got[member], n, min(n, numel - a))
            if keep:
                if a < numel:
                    rows.append((a, min(n, numel - a), n, got[member]))
                if member == rank:  # (the sums straight from the bytes unless the error itself is asked for)
                    sq = None if owner_error else codec_error_sums.from_bytes(codec, got[member], n, means[k])
                    if sq is None:
                        sq = _error_sums(means[k], codec.decode(got[member], n, out=scratch[:n]), errors[lo:lo + n])
                    mean_sq, error_sq = mean_sq + sq[0], error_sq + sq[1]
                continue
            whole = a + n <= numel
            dst = codec.decode(got[member], n, out=average[a:a + n] if whole else scratch[:n])
            if not whole and a < numel:
                average[a:].copy_(dst[:numel - a])
            if member == rank:  # the owner's own bytes decoded: its codec error, no extra decode
                sq = _error_sums(means[k], dst, errors[lo:lo + n])
                mean_sq, error_sq = mean_sq + sq[0], error_sq + sq[1]
    codec_error = math.sqrt(error_sq) / math.sqrt(mean_sq) if mean_sq > 0 else 0.0
    mine = rank * chunk
    loss = (min(mine, numel), errors[:max(0, min(chunk, numel - mine))]) if owner_error else None
    # Counted from the buffers themselves: what leaves for other members in each phase
    # (a member's own slice never touches the wire), and symmetrically what arrives.
    sent = received = (size - 1) * (sum(slots) + off2[-1])
    if norms is not None:  # clip's one fp32 per member
        sent, received = sent + 4 * (size - 1), received + 4 * (size - 1)
    return ExchangeResult(average, sent, received, size, time.perf_counter() - start,
                          dropped=size - accepted, codec_error=codec_error, owner_error=loss,
                          rejected=screened.rejected,
                          clipped=[(m, c) for m, c in enumerate(screened.factors) if c < 1.0], reports=reports,
                          finite=finite, encoded=EncodedAverage(codec, rows) if keep else None)


def _error_sums(mean: torch.Tensor, dst: torch.Tensor, errors: torch.Tensor) -> tuple[float, float]:
    """errors ← mean − dst (the owner's re-encode loss) and (‖mean‖², ‖errors‖²): one pass with
    the kernel (codec_kernels.sub_with_sumsq, a logged figure's sums), else torch's three."""
    got = codec_kernels.sub_with_sumsq(mean, dst, errors)
    if got is not None:
        return got
    return mean.norm().item() ** 2, torch.sub(mean, dst, out=errors).norm().item() ** 2


def _check_out(out: torch.Tensor, numel: int) -> torch.Tensor:
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != numel:
        raise ValueError(f"out= must be a contiguous fp32 CPU tensor of {numel} elements, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out.view(-1)


def _report_bytes(report: RoundReport) -> torch.Tensor:
    return torch.tensor([report.tokens, report.steps, report.ready_seconds], dtype=torch.float64).view(torch.uint8)


def _report_from(raw: torch.Tensor) -> RoundReport:
    return RoundReport(*raw.clone().view(torch.float64).tolist())
