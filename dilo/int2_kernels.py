"""One-pass numba kernels for the int2 codec (dilo/codec_lowbit.py), the sparse codec's
are in dilo/sparse_kernels.py.

They produce exactly the torch path's bytes (tests/test_lowbit_kernels.py compares
both paths, and tests/test_codec_lowbit.py a plain-Python reference), block by block:
each block is read once into cache and its codes are written straight into the
caller's buffer. What "exactly" takes:

int2's scale is ``sqrt(sum(x**2) / b)`` with the sum in fp64, and fp64 addition is not
associative: the kernel adds the squares in the order torch's CPU sum kernel does
(``cascade_sum`` → ``vectorized_inner_sum`` in aten's SumKernel.cpp: ``V`` lanes of
``Vectorized<double>`` — 4 in torch 2.13, under AVX2 and AVX512 alike — times 4 interleaved
accumulators, carried through 4 levels of ``2**max(4, ceil(log2(n/4V))/4)`` steps,
then the scalar tail, then the lanes in order). That order is torch's, not a
contract, so the first use per block size checks it against ``Int2._scale`` on a
random chunk and, if they differ (another CPU capability, another torch), keeps
torch's reduction for the scales and runs the rest here, saying so once in the log.
Blocks of ``>= 32768`` elements (torch may split one such row across threads) always
take their scales from torch. A block whose sum is NaN gets its scale from torch too
(which NaN payload survives depends on the order of operands in each add); its codes
do not depend on it (it divides by 1).

Without numba (``codec_kernels.BACKEND == "torch"``) dilo/codec_lowbit.py runs its torch
code and says so once in the log (``codec_kernels.warn_if_slow``), as int8 and fp4 do.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dilo import codec_kernels
from dilo.codec_base import _blocks

__all__ = ["int2_decode", "int2_encode"]

log = logging.getLogger(__name__)

_GRAIN = 32768  # at::internal::GRAIN_SIZE: a row this long may be summed by several threads
_INT2_LEVELS = np.array([-1.5, -0.5, 0.5, 1.5], dtype=np.float32)
_lanes: dict[int, int] = {}  # block size -> lanes of torch's fp64 sum that match it (0: none)

if codec_kernels.numba is not None:
    from numba import njit

    _kernel = njit(cache=True, nogil=True)

    @_kernel
    def _ceil_log2(n):
        r = 0
        while (1 << r) < n:
            r += 1
        return r

    @_kernel
    def _rows16(sq, first, rows, a):
        """a[t] += sq[first + 16 r + t] for r < rows, t < 16: 16 accumulators, row by row."""
        for r in range(rows):
            base = first + 16 * r
            for t in range(16):
                a[t] += sq[base + t]

    @njit(cache=True, nogil=True, inline="always")
    def _sumsq(sq, lanes, acc):
        """The sum of ``sq`` (fp64 squares of a row) in torch's order: ``acc`` holds the 4 levels
        of 4 x ``lanes`` accumulators. (Indices, not slices: a slice costs a reference count.)"""
        b = sq.size
        w = 4 * lanes
        vec = b // lanes
        size = vec // 4
        power = max(4, _ceil_log2(size) // 4)
        step = 1 << power
        mask = step - 1
        short = size <= step and w == 16  # one step at most: the levels only move level 0
        for t in range(w if short else 4 * w):  # (exact copies, as x + 0.0 == x here): skipped
            acc[t] = 0.0
        i = 0
        if short:
            _rows16(sq, 0, size, acc)
            i = size
        while i + step <= size:
            if w == 16:  # torch's 4 lanes x 4 accumulators: a constant trip count vectorizes
                _rows16(sq, i * 16, step, acc)
                i += step
            else:
                for _ in range(step):
                    for t in range(w):
                        acc[t] += sq[i * w + t]
                    i += 1
            for j in range(1, 4):
                for t in range(w):
                    acc[j * w + t] += acc[(j - 1) * w + t]
                    acc[(j - 1) * w + t] = 0.0
                if (i & (mask << (j * power))) != 0:
                    break
        for i2 in range(i, size):
            for t in range(w):
                acc[t] += sq[i2 * w + t]
        for j in range(1, 1 if short else 4):
            for t in range(w):
                acc[t] += acc[j * w + t]
        for v_i in range(size * 4, vec):  # row_sum's tail vectors, into accumulator 0
            for t in range(lanes):
                acc[t] += sq[v_i * lanes + t]
        for k in range(1, 4):
            for t in range(lanes):
                acc[t] += acc[k * lanes + t]
        total = 0.0
        for e in range(vec * lanes, b):
            total += sq[e]
        for t in range(lanes):
            total += acc[t]
        return total

    @njit(cache=True, nogil=True, inline="always")
    def _block_sum(x, start, stop, block_size, lanes, sq, acc):
        """sum(x[start:stop]**2) in fp64 as torch sums the zero-padded block."""
        xb, tail = x[start:stop], sq[stop - start:]  # (slices indexed from 0: no wraparound
        for i in range(xb.size):  # check, so the loops vectorize) x**2 exactly (fits a float64)
            v = np.float64(xb[i])
            sq[i] = v * v
        for i in range(tail.size):
            tail[i] = 0.0
        # (inlined: with the usual 4 lanes a constant, its loops unroll)
        return _sumsq(sq, 4, acc) if lanes == 4 else _sumsq(sq, lanes, acc)

    @_kernel
    def _int2_scales(x, sums, scales, block_size, lanes):
        """Every block's sum of squares (fp64) and scale; returns how many sums are NaN."""
        n = x.size
        acc, sq = np.zeros(16 * lanes, np.float64), np.empty(block_size, np.float64)
        nans = 0
        for blk, start in enumerate(range(0, n, block_size)):
            total = _block_sum(x, start, min(start + block_size, n), block_size, lanes, sq, acc)
            nans += total != total
            sums[blk] = total
            scales[blk] = np.float32(np.sqrt(total / block_size))
        return nans

    @_kernel
    def _block_codes(x, start, stop, s, codes, out):
        """The 2-bit codes of x[start:stop] given its block's scale ``s``, into the packed ``out``."""
        n = x.size
        lo, hi, zero, one, two = np.float32(-2), np.float32(1), np.float32(0), np.float32(1), np.float32(2)
        divisor = s if s > 0 else one
        head = start % 4  # codes of the byte a previous block began
        xb, cb = x[start:stop], codes[head:head + stop - start]
        for i in range(xb.size):
            w = xb[i] / divisor
            w = zero if w != w else np.floor(w)
            w = lo if w < lo else w
            w = hi if w > hi else w
            cb[i] = np.uint8(w + two)
        m = head + stop - start
        if stop == n:  # padding codes are 0
            while m % 4:
                codes[m] = 0
                m += 1
        first = start // 4
        full_from = 0
        if head:
            byte = np.int64(out[first])
            for i in range(head, min(4, m)):
                byte |= np.int64(codes[i]) << (2 * i)
            out[first] = np.uint8(byte)
            full_from = 4
            first += 1
        if m <= full_from:
            return
        whole = (m - full_from) // 4
        ob, cw = out[first:first + whole], codes[full_from:full_from + 4 * whole]
        for j in range(ob.size):
            ob[j] = cw[4 * j] | (cw[4 * j + 1] << 2) | (cw[4 * j + 2] << 4) | (cw[4 * j + 3] << 6)
        rest = m - full_from - 4 * whole
        if rest > 0:  # the start of a byte the next block ends
            byte = np.int64(0)
            for i in range(rest):
                byte |= np.int64(codes[full_from + 4 * whole + i]) << (2 * i)
            out[first + whole] = np.uint8(byte)

    @_kernel
    def _int2_codes(x, scales, out, block_size):
        """Codes of every block, given its scale (torch's, when the sum order is not reproduced)."""
        codes = np.empty(block_size + 4, np.uint8)
        for blk, start in enumerate(range(0, x.size, block_size)):
            _block_codes(x, start, min(start + block_size, x.size), scales[blk], codes, out)

    @_kernel
    def _int2_encode(x, scales, out, block_size, lanes):
        """Scale and codes block by block (x is read from memory once); returns how many
        blocks summed to NaN (their scales are torch's to set, their codes do not depend on it)."""
        n = x.size
        acc, sq = np.zeros(16 * lanes, np.float64), np.empty(block_size, np.float64)
        codes = np.empty(block_size + 4, np.uint8)
        nans = 0
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            total = _block_sum(x, start, stop, block_size, lanes, sq, acc)
            nans += total != total
            scales[blk] = np.float32(np.sqrt(total / block_size))
            _block_codes(x, start, stop, scales[blk], codes, out)
        return nans

    @_kernel
    def _int2_decode(packed, scales, out, block_size, levels):
        n = out.size
        table = np.empty(4, np.float32)
        half = levels[3]  # 1.5, passed in: no constant for LLVM to fold into the product
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            s = scales[blk]
            for c in range(4):
                table[c] = levels[c] * s
            i = start
            if start % 4 == 0:  # whole bytes: 4 values each, the code's level times s
                pb = packed[start // 4:stop // 4]
                ob = out[start:start + 4 * pb.size]
                for j in range(pb.size):  # (c - 1.5) is the level exactly, the product the same
                    byte = np.int32(pb[j])
                    for t in range(4):
                        ob[4 * j + t] = (np.float32((byte >> (2 * t)) & 3) - half) * s
                i = start + 4 * pb.size
            for e in range(i, stop):
                out[e] = table[(packed[e >> 2] >> (2 * (e & 3))) & 3]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _torch_lanes(block_size: int) -> int:
    """Lanes with which ``_sumsq`` adds in torch's order for this block size (0: none does).

    Checked once per block size on the fp64 sums themselves (the fp32 scales would hide
    most order differences): ``V`` when ``b >= V``, else 1 (torch's scalar loop, the same
    structure with one lane), for the first ``V`` that gives torch's sums bit for bit."""
    if block_size >= _GRAIN:
        return 0
    if block_size not in _lanes:
        gen = torch.Generator().manual_seed(12345)
        x = torch.randn(max(9 * block_size, 1 << 14) - block_size // 2, generator=gen)
        x *= torch.logspace(-3, 3, x.numel())[torch.randperm(x.numel(), generator=gen)]
        want = _blocks(x, block_size).double().square_().sum(dim=1)  # as Int2._scale sums
        _lanes[block_size] = 0
        for vec in (4, 8, 2, 16):  # torch 2.13 sums fp64 in 4 lanes, under AVX2 and AVX512 alike
            lanes = vec if block_size >= vec else 1
            got = np.empty(want.numel(), np.float64)
            _int2_scales(_np(x), got, np.empty(want.numel(), np.float32), block_size, lanes)
            if np.array_equal(got.view(np.int64), _np(want).view(np.int64)):
                _lanes[block_size] = lanes
                break
        if not _lanes[block_size]:
            log.warning("int2 kernels: torch's fp64 sum order is not reproduced for blocks of %d "
                        "(torch %s, %s); the scales come from torch, the codes from the kernel",
                        block_size, torch.__version__, torch.backends.cpu.get_cpu_capability())
    return _lanes[block_size]


def int2_encode(codec, x: torch.Tensor, out: torch.Tensor) -> None:
    """Encode contiguous fp32 ``x`` into ``out`` (checked by the codec) as ``codec`` (Int2) does."""
    n, b = x.numel(), codec.block_size
    payload = codec._payload_nbytes(n)
    blocks = codec._num_blocks(n)
    scales = np.empty(blocks, np.float32)
    lanes = _torch_lanes(b)
    t = torch.from_numpy(scales)
    if not lanes:  # torch's own reduction, chunk by chunk as the torch path, then the codes
        for el, bl in codec._chunks(n):
            t[bl] = codec._scale(_blocks(x[el], b)).view(-1)
        _int2_codes(_np(x), scales, _np(out[:payload]), b)
    elif _int2_encode(_np(x), scales, _np(out[:payload]), b, lanes):
        for blk in np.flatnonzero(np.isnan(scales)).tolist():  # torch's NaN payloads
            t[blk] = codec._scale(_blocks(x[blk * b:(blk + 1) * b], b)).view(())
    out[payload:] = t.view(torch.uint8)


def int2_decode(codec, buf: torch.Tensor, numel: int, out: torch.Tensor) -> None:
    packed, scale = codec._split(buf, numel)
    _int2_decode(_np(packed), _np(scale), _np(out), codec.block_size, _INT2_LEVELS)
