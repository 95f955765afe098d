"""The owner's `codec_error` read from its own encoded bytes, a tile at a time.

`codec_error` = ‖mean − decode(encode(mean))‖ / ‖mean‖ over the chunk a member owns (a
logged figure, `SyncStats.codec_error`). The exchange computed it by decoding the owner's
bytes into a chunk-sized fp32 buffer and then forming mean − decoded into another with both
sums of squares (`codec_kernels.sub_with_sumsq`): at 100M parameters and 4 members that is
100 MB written twice and read back, ≈ 9% of an outer step's CPU, for two numbers.

When nobody asks for the difference itself (`comm.owner_feedback` off) and the average is
kept encoded (`two_phase_average(keep_encoded=True)`: no decoded copy of the owner's rows is
made anyway), `from_bytes` decodes 4096 elements at a time into a buffer that stays in cache
with the codec's own decode kernel, forms the difference there and sums both squares per
4096-element block with the same function as `sub_with_sumsq`, over the same blocks (and on
the same threads): the same values, so the same `codec_error` bits, without the two
chunk-sized writes.
"""

from __future__ import annotations

import numpy as np
import torch

from dilo import codec_kernels

_CODECS = {"int8": True, "fp4": False}  # codecs read here (True: int8), as outer_sgd's decode-and-step

if codec_kernels.numba is not None:
    from dilo.codec_kernels import _STAT_BLOCK, _block_sumsq, _decode_range

    @codec_kernels.njit(cache=True, nogil=True)
    def _ERROR_SUMS(codes, n, start, int8, block, values, mean, sums_mean, sums_err):
        """Per 4096-element block b of `mean` (elements [start, start + mean.size) of the
        encoding `codes` of n elements): sums_mean[b] = Σ mean², sums_err[b] = Σ (mean − decoded)²."""
        tile = np.empty(_STAT_BLOCK, np.float32)
        tile_bits = tile.view(np.int32)
        for blk, lo in enumerate(range(0, mean.size, _STAT_BLOCK)):
            hi = min(lo + _STAT_BLOCK, mean.size)
            d = tile[:hi - lo]
            _decode_range(codes, n, start + lo, int8, block, values, d, tile_bits[:hi - lo])
            mb = mean[lo:hi]
            for i in range(d.size):
                d[i] = mb[i] - d[i]
            sums_mean[blk] = _block_sumsq(mb)
            sums_err[blk] = _block_sumsq(d)


def from_bytes(codec, codes: torch.Tensor, n: int, mean: torch.Tensor) -> tuple[float, float] | None:
    """(Σ mean², Σ (mean − decode(codes))²) of the n elements `codes` encodes, as
    `sub_with_sumsq(mean, decoded, ·)` would return them; None when the kernel does not run
    here (no numba, another codec, `mean` not n contiguous fp32 CPU elements)."""
    if (codec_kernels.BACKEND != "numba" or codec.name not in _CODECS or mean.numel() != n
            or not codec_kernels._fast(mean)):
        return None
    sums = np.empty((2, -(-n // _STAT_BLOCK)))
    raw, mn, int8, block = codes.numpy(), mean.detach().numpy(), _CODECS[codec.name], codec.block_size

    def run(lo: int, hi: int) -> None:  # (slices of whole 4096-element blocks)
        b = lo // _STAT_BLOCK
        _ERROR_SUMS(raw, n, lo, int8, block, codec_kernels._VALUES, mn[lo:hi], sums[0, b:], sums[1, b:])
    codec_kernels._in_slices(n, run)
    return float(sums[0].sum()), float(sums[1].sum())


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, not inside the first exchange."""
    if codec_kernels.BACKEND == "numba":
        x = np.zeros(4, np.float32)
        for int8 in (True, False):
            _ERROR_SUMS(np.zeros(8, np.uint8), 4, 0, int8, 4, codec_kernels._VALUES, x, np.empty(1), np.empty(1))
