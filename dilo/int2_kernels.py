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

The usual case (4 lanes; ``b`` a multiple of 16 up to 256, as the default 256, so one
level step covers a block) has its own kernel, ``_int2_encode16``: its 16 accumulators
are four ``<4 x double>`` values in LLVM IR written here (``_sumsq16``, no fast-math
flags: no FMA, no reordering), which stay in registers. numba keeps an array of
accumulators in memory (a store and a reload per row of 16), and its SLP vectorizer,
which would pack 16 scalar accumulators, is off by default (numba PR #8852). The same
first-use check runs through ``_sumsq16``. The codes of a whole block go into a scratch
row, then four at a time from one uint32 into a byte (little-endian machines; others
take the general kernel).

Without numba (``codec_kernels.BACKEND == "torch"``) dilo/codec_lowbit.py runs its torch
code and says so once in the log (``codec_kernels.warn_if_slow``), as int8 and fp4 do.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

from dilo import codec_kernels
from dilo.codec_base import _blocks

__all__ = ["int2_decode", "int2_encode"]

log = logging.getLogger(__name__)

_GRAIN = 32768  # at::internal::GRAIN_SIZE: a row this long may be summed by several threads
_INT2_LEVELS = np.array([-1.5, -0.5, 0.5, 1.5], dtype=np.float32)
_lanes: dict[int, int] = {}  # block size -> lanes of torch's fp64 sum that match it (0: none)
_LITTLE = sys.byteorder == "little"  # whole blocks pack 4 codes from one uint32 (byte 0 lowest)

if codec_kernels.numba is not None:
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    _kernel = njit(cache=True, nogil=True)

    @intrinsic
    def _sumsq16(typingctx, x, start, rows):
        """sum(x[start:start + 16 rows]**2) in fp64 in torch's order for rows <= 16 (one level
        step): accumulator j (lanes 4j..4j+3 of each row of 16) is a <4 x double>; then
        ((acc0 + acc1) + acc2) + acc3, then its lanes in order. No bounds check: the caller's."""
        if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 1
                and x.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            ary, first, count = args
            data = context.make_array(signature.args[0])(context, builder, ary).data
            f4, d4 = ir.VectorType(ir.FloatType(), 4), ir.VectorType(ir.DoubleType(), 4)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(d4, [0.0] * 4)) for _ in range(4)]
            with cgutils.for_range(builder, count) as loop:  # (no fast-math flags: no FMA, no reorder)
                row = builder.gep(data, [builder.add(first, builder.mul(loop.index, count.type(16)))])
                for j in range(4):
                    ptr = builder.bitcast(builder.gep(row, [count.type(4 * j)]), f4.as_pointer())
                    v = builder.fpext(builder.load(ptr, align=4), d4)
                    builder.store(builder.fadd(builder.load(acc[j]), builder.fmul(v, v)), acc[j])
            lanes = builder.load(acc[0])
            for j in range(1, 4):
                lanes = builder.fadd(lanes, builder.load(acc[j]))
            total = ir.Constant(ir.DoubleType(), 0.0)
            for t in range(4):
                total = builder.fadd(total, builder.extract_element(lanes, ir.IntType(32)(t)))
            return total

        return types.float64(x, types.intp, types.intp), codegen

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
        if lanes == 4 and block_size % 16 == 0 and block_size <= 256 and stop - start == block_size:
            return _sumsq16(x, start, block_size // 16)  # the usual case: vectors in registers
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

    @njit(cache=True, nogil=True, inline="always")
    def _code(v, divisor):
        """clamp(floor(v / divisor), -2, 1) + 2, NaN as 0 (fp32, as _block_codes)."""
        w = v / divisor
        w = np.float32(0) if w != w else np.floor(w)
        w = np.float32(-2) if w < np.float32(-2) else w
        w = np.float32(1) if w > np.float32(1) else w
        return np.uint8(w + np.float32(2))

    @njit(cache=True, nogil=True, inline="always")
    def _whole_codes(x, start, block_size, s, codes, words, out):
        """_block_codes for a whole block with ``block_size % 4 == 0`` (it starts a byte) on a
        little-endian machine: the codes into ``codes`` (a loop that vectorizes), then each
        uint32 ``words[j]`` of it (codes 4j..4j+3, byte 0 lowest) shifted into one byte."""
        divisor = s if s > 0 else np.float32(1)
        xb = x[start:start + block_size]
        for i in range(block_size):
            codes[i] = _code(xb[i], divisor)
        ob = out[start // 4:(start + block_size) // 4]
        for j in range(ob.size):
            u = words[j]
            u |= u >> 6  # code 4j+1 to bits 2-3, 4j+3 to bits 18-19
            u |= u >> 12  # codes 4j+2, 4j+3 to bits 4-7
            ob[j] = np.uint8(u & 0xFF)

    @_kernel
    def _int2_codes(x, scales, out, block_size, little):
        """Codes of every block, given its scale (torch's, when the sum order is not reproduced)."""
        codes = np.empty(block_size + 4, np.uint8)
        words = codes[:block_size // 4 * 4].view(np.uint32)
        whole = little and block_size % 4 == 0
        for blk, start in enumerate(range(0, x.size, block_size)):
            stop = min(start + block_size, x.size)
            if whole and stop - start == block_size:
                _whole_codes(x, start, block_size, scales[blk], codes, words, out)
            else:
                _block_codes(x, start, stop, scales[blk], codes, out)

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
    def _int2_encode16(x, scales, out, block_size):
        """_int2_encode for the whole blocks of the usual case (``_fast``): the sum in vector
        registers, the codes as whole bytes."""
        codes = np.empty(block_size, np.uint8)
        words = codes.view(np.uint32)
        nans = 0
        for blk in range(x.size // block_size):
            start = blk * block_size
            total = _sumsq16(x, start, block_size // 16)
            nans += total != total
            s = np.float32(np.sqrt(total / block_size))
            scales[blk] = s
            _whole_codes(x, start, block_size, s, codes, words, out)
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


def _fast(block_size: int, lanes: int) -> bool:
    """The usual case, _int2_encode16's: torch's 4 lanes, one level step per block (b <= 256)
    of whole rows of 16, and a little-endian machine (4 codes from one uint32, byte 0 lowest)."""
    return lanes == 4 and block_size % 16 == 0 and block_size <= 256 and _LITTLE


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
        _int2_codes(_np(x), scales, _np(out[:payload]), b, _LITTLE)
    else:
        whole = n // b if _fast(b, lanes) else 0  # whole blocks of the usual case, then the rest
        nans = _int2_encode16(_np(x[:whole * b]), scales, _np(out[:whole * b // 4]), b) if whole else 0
        if whole < blocks:
            nans += _int2_encode(_np(x[whole * b:]), scales[whole:], _np(out[whole * b // 4:payload]),
                                 b, lanes)
        if nans:
            for blk in np.flatnonzero(np.isnan(scales)).tolist():  # torch's NaN payloads
                t[blk] = codec._scale(_blocks(x[blk * b:(blk + 1) * b], b)).view(())
    out[payload:] = t.view(torch.uint8)


def int2_decode(codec, buf: torch.Tensor, numel: int, out: torch.Tensor) -> None:
    packed, scale = codec._split(buf, numel)
    _int2_decode(_np(packed), _np(scale), _np(out), codec.block_size, _INT2_LEVELS)
