"""One-pass numba kernels for the sparse codec (dilo/codec_lowbit.py); int2's are in
dilo/int2_kernels.py, with the same rules: exactly the torch path's bytes (compared in
tests/test_lowbit_kernels.py), one read of each block.

sparse's top-k keeps every key above the k-th largest key ``t`` and the ties at ``t``
with the lowest indices, which is what the torch path selects, however ``t`` is found:
here as the k-th largest of the candidates, the elements at or above a bound just under
the previous block's ``t`` (lowered until at least k are), on the keys' int32 bit
patterns (non-negative floats order like them). The key is the torch path's
``|x|.nan_to_num(nan=inf)``: NaN counts as inf, and inf as the largest finite float.
``torch.amax``/``amin`` give the canonical quiet NaN for any NaN, and the kernel does
the same; every fp32 operation of the quantizer is the torch path's, in its order.

Without numba (``codec_kernels.BACKEND == "torch"``) dilo/codec_lowbit.py runs its torch
code and says so once in the log (``codec_kernels.warn_if_slow``), as int8 and fp4 do.
"""

from __future__ import annotations

import numpy as np
import torch

from dilo import codec_kernels
from dilo.codec_base import _as

__all__ = ["sparse_decode_range", "sparse_encode"]

_NAN_BITS = 0x7FC00000
_INF_BITS = 0x7F800000

if codec_kernels.numba is not None:
    from numba import njit

    _kernel = njit(cache=True, nogil=True)

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
    payload = codec._layout(numel)[1]
    scales = _as(buf[payload:], torch.float32)
    rc = _sparse_decode(_np(buf), _np(scales), _np(out), numel, lo, hi, b, codec.keep, codec.low_bits,
                        codec.value_bits, codec._block_nbytes(b))
    if rc <= -(1 << 40):
        raise ValueError(f"sparse payload is malformed: an offset beyond its block (block {-(1 << 40) - rc})")
    if rc < 0:
        raise ValueError(f"sparse payload is malformed: block {-1 - rc} holds the wrong number of offsets")
