"""One-pass numba kernels for the int2 and sparse codecs (dilo/codec_lowbit.py).

They produce exactly the torch path's bytes (tests/test_lowbit_kernels.py compares
both paths, and tests/test_codec_lowbit.py a plain-Python reference), block by block:
each block is read once into cache and its codes are written straight into the
caller's buffer. What "exactly" takes, operation by operation:

- int2's scale is ``sqrt(sum(x**2) / b)`` with the sum in fp64, and fp64 addition is not
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
- sparse's top-k keeps every key above the k-th largest key ``T`` and the ties at ``T``
  with the lowest indices, which is what the torch path selects, however ``T`` is found:
  here from a sample of the block (a guess ``g``, then the exact k-th largest among the
  elements ``>= g``), on the keys' int32 bit patterns (non-negative floats order like
  them; NaN counts as inf, and inf as the largest finite float, which is what the torch
  path's ``nan_to_num(nan=inf)`` makes of them). ``torch.amax``/``amin`` give the canonical quiet NaN for any
  NaN, and the kernel does the same; every fp32 operation of the quantizer is the
  torch path's, in its order.

Without numba (``codec_kernels.BACKEND == "torch"``) dilo/codec_lowbit.py runs its torch
code and says so once in the log (``codec_kernels.warn_if_slow``), as int8 and fp4 do.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dilo import codec_kernels
from dilo.codec_base import _as, _blocks

__all__ = ["int2_decode", "int2_encode", "sparse_decode_range", "sparse_encode"]

log = logging.getLogger(__name__)

_GRAIN = 32768  # at::internal::GRAIN_SIZE: a row this long may be summed by several threads
_NAN_BITS = 0x7FC00000
_INF_BITS = 0x7F800000
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
        for t in range(4 * w):
            acc[t] = 0.0
        i = 0
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
        for j in range(1, 4):
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

    @_kernel
    def _int2_scales(x, sums, scales, block_size, lanes):
        """Every block's sum of squares (fp64) and scale; returns how many sums are NaN."""
        n = x.size
        acc = np.zeros(16 * lanes, np.float64)
        sq = np.empty(block_size, np.float64)
        nans = 0
        for blk, start in enumerate(range(0, n, block_size)):
            xb = x[start:min(start + block_size, n)]
            for i in range(xb.size):  # x**2 exactly (a float32 squared fits a float64)
                v = np.float64(xb[i])
                sq[i] = v * v
            for i in range(xb.size, block_size):
                sq[i] = 0.0
            # (inlined: with the usual 4 lanes a constant, its loops unroll)
            total = _sumsq(sq, 4, acc) if lanes == 4 else _sumsq(sq, lanes, acc)
            if total != total:
                nans += 1
            sums[blk] = total
            scales[blk] = np.float32(np.sqrt(total / block_size))
        return nans

    @_kernel
    def _int2_codes(x, scales, out, block_size):
        """2-bit codes of every block, given its scale, packed 4 to a byte into ``out``."""
        n = x.size
        codes = np.empty(block_size + 4, np.uint8)
        lo, hi, zero, one, two = np.float32(-2), np.float32(1), np.float32(0), np.float32(1), np.float32(2)
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            s = scales[blk]
            divisor = s if s > 0 else one
            head = start % 4  # codes of the byte a previous block began
            xb = x[start:stop]
            cb = codes[head:head + xb.size]
            for i in range(xb.size):
                w = xb[i] / divisor
                w = zero if w != w else np.floor(w)
                w = lo if w < lo else w
                w = hi if w > hi else w
                cb[i] = np.uint8(w + two)
            m = head + xb.size
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
                continue
            whole = (m - full_from) // 4
            ob = out[first:first + whole]
            cw = codes[full_from:full_from + 4 * whole]
            for j in range(whole):
                ob[j] = cw[4 * j] | (cw[4 * j + 1] << 2) | (cw[4 * j + 2] << 4) | (cw[4 * j + 3] << 6)
            rest = m - full_from - 4 * whole
            if rest > 0:  # the start of a byte the next block ends
                byte = np.int64(0)
                for i in range(rest):
                    byte |= np.int64(codes[full_from + 4 * whole + i]) << (2 * i)
                out[first + whole] = np.uint8(byte)

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

    # -- sparse ------------------------------------------------------------------------
    @_kernel
    def _count_ge(u, r, g):
        c = 0
        for i in range(r):
            c += u[i] >= g
        return c

    @_kernel
    def _select(a, c, target):
        """The ``target``-th smallest (from 0) of ``a[:c]`` (reorders it): 3-way quickselect."""
        lo, hi = 0, c - 1
        while lo < hi:
            p0, p1, p2 = a[lo], a[(lo + hi) // 2], a[hi]
            pivot = max(min(p0, p1), min(max(p0, p1), p2))  # the median of three
            lt, i, gt = lo, lo, hi
            while i <= gt:
                v = a[i]
                if v < pivot:
                    a[i], a[lt] = a[lt], v
                    lt += 1
                    i += 1
                elif v > pivot:
                    a[i], a[gt] = a[gt], v
                    gt -= 1
                else:
                    i += 1
            if target < lt:
                hi = lt - 1
            elif target > gt:
                lo = gt + 1
            else:
                return pivot
        return a[target]

    @_kernel
    def _top_k(u, r, k, guess, cand, cand_idx, work, idx):
        """Indices (increasing, into ``idx``) of the k largest of the non-negative int32
        ``u[:r]``, ties to the lower index; returns the k-th largest value ``t``.

        ``guess`` (the previous block's ``t``) only sets the work: the candidates are the
        elements ``>=`` a bound a little under it, lowered (by factors of 4, to 0 at worst)
        until at least k are; every chosen element is a candidate, and the candidates keep
        the order of their indices."""
        g = max(np.int32(0), guess - np.int32(1 << 21))  # about 0.84 x guess
        c = _count_ge(u, r, g)
        while c < k:
            g = max(np.int32(0), g - np.int32(2 << 23))
            c = _count_ge(u, r, g)
        c = 0
        for i in range(r):  # taken rarely: a predicted branch beats a branchless store
            if u[i] >= g:
                cand[c] = u[i]
                cand_idx[c] = i
                c += 1
        work[:c] = cand[:c]
        t = _select(work, c, c - k)
        need = k - _count_ge(cand, c, t + 1)  # ties at t to take, lowest indices first
        j = 0
        for i in range(c):
            v = cand[i]
            if v > t or (v == t and need > 0):
                need -= v == t
                idx[j] = cand_idx[i]
                j += 1
        return t

    @_kernel
    def _put_bits(out, base, pos, value, nbits):
        for t in range(nbits):
            if (value >> t) & 1:
                p = pos + t
                out[base + (p >> 3)] |= np.uint8(1 << (p & 7))

    @_kernel
    def _sparse_encode(bits, out, scales, block_size, k, low, vb, full_nbytes):
        n = bits.size
        u = np.empty(block_size, np.int32)
        cand, work = np.empty(block_size, np.int32), np.empty(block_size, np.int32)
        cand_idx = np.empty(block_size, np.int64)
        t = np.int32(_INF_BITS)  # the previous block's k-th largest key: the next one's first guess
        idx = np.empty(k, np.int64)
        fld = np.empty(k, np.int64)
        mag = np.empty(k, np.float32)
        cell = np.zeros(1, np.float32)
        cell_bits = cell.view(np.int32)
        levels = 1 << (vb - 1)
        top = np.float32(levels - 1)
        half, zero = np.float32(0.5), np.float32(0)
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            r = stop - start
            xb = bits[start:stop]
            for i in range(r):  # the torch path's key |x|.nan_to_num(nan=inf): inf -> the largest float
                v = xb[i] & np.int32(0x7FFFFFFF)
                v = np.int32(_INF_BITS) if v > _INF_BITS else (np.int32(_INF_BITS - 1) if v == _INF_BITS else v)
                u[i] = v
            kept = min(k, r)
            if r >= k:
                t = _top_k(u, r, k, t, cand, cand_idx, work, idx)
            else:  # every element, then zero padding (which sets m to 0, or NaN)
                for i in range(r):
                    idx[i] = i
            # kept magnitudes; max/min with any NaN give the canonical NaN (as torch)
            hmax, hmin = np.int32(0), np.int32(0x7FFFFFFF)
            nan = False
            for j in range(kept):
                a = xb[idx[j]] & np.int32(0x7FFFFFFF)
                nan |= a > _INF_BITS
                hmax, hmin = max(hmax, a), min(hmin, a)
                cell_bits[0] = a
                mag[j] = cell[0]
            if r < k:
                hmin = np.int32(0)
            cell_bits[0] = np.int32(_NAN_BITS) if nan else hmax
            s = cell[0]
            cell_bits[0] = np.int32(_NAN_BITS) if nan else hmin
            m = cell[0]
            step = (s - m) / top
            ok = step > 0
            for j in range(kept):
                q = 0
                if ok:
                    w = np.floor((mag[j] - m) / step + half)
                    w = zero if w != w else w
                    w = zero if w < zero else w
                    w = top if w > top else w
                    q = np.int64(w)
                cell_bits[0] = xb[idx[j]]
                fld[j] = (np.int64(1) if cell[0] < zero else np.int64(0)) | (q << 1)
            upper = kept + ((r - 1) >> low) + 1
            total = upper + kept * (low + vb)
            nbytes = (total + 7) // 8
            base = blk * full_nbytes
            out[base:base + nbytes] = 0
            for j in range(kept):
                p = (idx[j] >> low) + j
                out[base + (p >> 3)] |= np.uint8(1 << (p & 7))
                _put_bits(out, base, upper + j * low, idx[j], low)
                _put_bits(out, base, upper + kept * low + j * vb, fld[j], vb)
            scales[2 * blk] = zero if r < k else m
            scales[2 * blk + 1] = s

    @_kernel
    def _get_bits(buf, base, pos, nbits):
        v = np.int64(0)
        for t in range(nbits):
            p = pos + t
            v |= np.int64((buf[base + (p >> 3)] >> (p & 7)) & 1) << t
        return v

    @_kernel
    def _sparse_decode(buf, scales, out, numel, lo, hi, block_size, k, low, vb, full_nbytes):
        """Elements [lo, hi) of the decoded vector into ``out``; returns 0, or -1 - block for a
        wrong count of offsets, or -(1 << 40) - block for an offset beyond its block."""
        levels = 1 << (vb - 1)
        top = np.float32(levels - 1)
        idx = np.empty(k, np.int64)
        out[:] = 0
        for blk in range(lo // block_size, (hi + block_size - 1) // block_size):
            start = blk * block_size
            r = min(block_size, numel - start)
            kept = min(k, r)
            upper = kept + ((r - 1) >> low) + 1
            base = blk * full_nbytes
            c = 0
            for p in range(upper):
                if (buf[base + (p >> 3)] >> (p & 7)) & 1:
                    if c < kept:
                        idx[c] = (p - c) << low
                    c += 1
            if c != kept:
                return -1 - blk
            m, s = scales[2 * blk], scales[2 * blk + 1]
            step = (s - m) / top
            for j in range(kept):
                i = idx[j] | _get_bits(buf, base, upper + j * low, low)
                if i >= r:
                    return -(1 << 40) - blk
                f = _get_bits(buf, base, upper + kept * low + j * vb, vb)
                mg = np.float32(f >> 1) * step + m
                e = start + i
                if lo <= e < hi:
                    out[e - lo] = -mg if f & 1 else mg
        return 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# -- int2 --------------------------------------------------------------------------------
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
    nans = _int2_scales(_np(x), np.empty(blocks, np.float64), scales, b, lanes) if lanes else -1
    t = torch.from_numpy(scales)
    if nans < 0:  # torch's own reduction, chunk by chunk as the torch path
        for el, bl in codec._chunks(n):
            t[bl] = codec._scale(_blocks(x[el], b)).view(-1)
    elif nans:  # the NaN blocks' payloads, as torch's order of operands leaves them
        for blk in np.flatnonzero(np.isnan(scales)).tolist():
            t[blk] = codec._scale(_blocks(x[blk * b:(blk + 1) * b], b)).view(())
    _int2_codes(_np(x), scales, _np(out[:payload]), b)
    out[payload:] = t.view(torch.uint8)


def int2_decode(codec, buf: torch.Tensor, numel: int, out: torch.Tensor) -> None:
    packed, scale = codec._split(buf, numel)
    _int2_decode(_np(packed), _np(scale), _np(out), codec.block_size, _INT2_LEVELS)


# -- sparse ------------------------------------------------------------------------------
def sparse_encode(codec, x: torch.Tensor, out: torch.Tensor) -> None:
    n, b = x.numel(), codec.block_size
    blocks, payload = codec._layout(n)
    scales = np.empty(2 * blocks, np.float32)
    xn = _np(x)
    _sparse_encode(xn.view(np.int32), _np(out[:payload]), scales, b, codec.keep, codec.low_bits,
                   codec.value_bits, codec._block_nbytes(b))
    out[payload:] = torch.from_numpy(scales).view(torch.uint8)


def sparse_decode_range(codec, buf: torch.Tensor, numel: int, lo: int, hi: int, out: torch.Tensor) -> None:
    b = codec.block_size
    blocks, payload = codec._layout(numel)
    scales = _as(buf[payload:], torch.float32)
    rc = _sparse_decode(_np(buf), _np(scales), _np(out), numel, lo, hi, b, codec.keep, codec.low_bits,
                        codec.value_bits, codec._block_nbytes(b))
    if rc <= -(1 << 40):
        raise ValueError(f"sparse payload is malformed: an offset beyond its block (block {-(1 << 40) - rc})")
    if rc < 0:
        raise ValueError(f"sparse payload is malformed: block {-1 - rc} holds the wrong number of offsets")
