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
_CTZ = np.zeros(256, np.int64)  # trailing zeros of a one-bit byte
for _i in range(8):
    _CTZ[1 << _i] = _i

if codec_kernels.numba is not None:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    _kernel = njit(cache=True, nogil=True)

    @intrinsic
    def _ctz(typingctx, word):
        """Trailing zero bits of a non-zero uint64 (LLVM's cttz: one instruction)."""
        if word != types.uint64:
            return None

        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.IntType(1)(1))

        return types.uint64(types.uint64), codegen

    @_kernel
    def _count_ge(u, r, g):
        c = 0
        for i in range(r):
            c += u[i] >= g
        return c

    @_kernel
    def _flag_ge(u, r, g, flags):
        """flags[i] = u[i] >= g for i < r; returns how many are set (one pass that vectorizes)."""
        c = 0
        for i in range(r):
            f = u[i] >= g
            flags[i] = f
            c += f
        return c

    @njit(cache=True, nogil=True, inline="always")
    def _keys(xb, r, g, u, flags):
        """The torch path's key ``|x|.nan_to_num(nan=inf)`` of the int32 bits ``xb[:r]`` (inf
        becomes the largest finite float) into ``u``, and flags[i] = u[i] >= g, in one pass
        that vectorizes; returns (how many flags are set, the largest key)."""
        c = 0
        top = np.int32(0)
        for i in range(r):
            v = xb[i] & np.int32(0x7FFFFFFF)
            v = np.int32(_INF_BITS) if v > _INF_BITS else (np.int32(_INF_BITS - 1) if v == _INF_BITS else v)
            u[i] = v
            f = v >= g
            flags[i] = f
            c += f
            top = max(top, v)
        return c, top

    @_kernel
    def _top_k(u, r, k, g, c, top, flags, cand, cand_idx, idx):
        """Indices (increasing, into ``idx``) of the k largest of the non-negative int32
        ``u[:r]`` (whose largest is ``top``), ties to the lower index; returns the k-th
        largest value ``t``.

        ``flags`` marks the ``c`` elements ``>= g``, the candidates; g is a bound a little
        under the previous block's t, lowered here (by factors of 4, to 0 at worst) until at
        least k are: every chosen element is a candidate, and the candidates keep the order
        of their indices. They are gathered a set flag at a time from 8 flags (one uint64
        of ``flags``) at a time, skipping the empty words: at 2% density most are."""
        drop = np.int32(1 << 21)  # about 0.84 x, 0.5 x, then by factors of 4
        while c < k:
            g = max(np.int32(0), g - drop)
            c = _flag_ge(u, r, g, flags)
            drop = np.int32(min(2 << 23, 4 * drop))
        for i in range(r, (r + 7) // 8 * 8):  # (the last word's padding)
            flags[i] = 0
        words = flags.view(np.uint64)
        c = 0
        for w in range((r + 7) // 8):
            word = words[w]
            while word:  # flags are 0 or 1: bit 8j is flag 8w + j
                i = 8 * w + np.int64(_ctz(word) >> np.uint64(3))
                cand[c] = u[i]
                cand_idx[c] = i
                c += 1
                word &= word - np.uint64(1)
        lo, hi = np.int64(g), np.int64(top) + 1  # at least k at or above lo, fewer at or above hi
        while hi - lo > 1:  # bisection on the bit patterns: counts vectorize, swaps do not
            mid = (lo + hi) >> 1
            if _count_ge(cand, c, mid) >= k:
                lo = mid
            else:
                hi = mid
        t = np.int32(lo)
        need = k - _count_ge(cand, c, t + 1)  # ties at t to take, lowest indices first
        j = 0
        for i in range(c):
            v = cand[i]
            if v > t or (v == t and need > 0):
                need -= v == t
                idx[j] = cand_idx[i]
                j += 1
        return t

    @njit(cache=True, nogil=True, inline="always")
    def _put_bits(out, base, pos, value, nbits):
        """OR the ``nbits`` low bits of ``value`` into ``out`` at bit ``pos`` past byte ``base``."""
        v = (np.int64(value) & ((np.int64(1) << nbits) - 1)) << (pos & 7)
        b = base + (pos >> 3)
        while v:  # only bytes that get a set bit: all within the block's bytes
            out[b] |= np.uint8(v & 0xFF)
            v >>= 8
            b += 1

    @_kernel
    def _sparse_encode(bits, out, scales, block_size, k, low, vb, full_nbytes):
        n = bits.size
        u = np.empty(block_size, np.int32)
        cand = np.empty(block_size, np.int32)
        cand_idx = np.empty(block_size, np.int64)
        flags = np.empty((block_size + 7) // 8 * 8, np.uint8)
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
            g = max(np.int32(0), t - np.int32(1 << 19))  # about 0.96 x the previous block's t
            c, high = _keys(xb, r, g, u, flags)
            kept = min(k, r)
            if r >= k:
                t = _top_k(u, r, k, g, c, high, flags, cand, cand_idx, idx)
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
        """The ``nbits`` bits at bit ``pos`` past byte ``base`` (within the block's bytes)."""
        first = base + (pos >> 3)
        v = np.int64(0)
        for t in range(((pos & 7) + nbits + 7) >> 3):
            v |= np.int64(buf[first + t]) << (8 * t)
        return (v >> (pos & 7)) & ((np.int64(1) << nbits) - 1)

    @_kernel
    def _sparse_decode(buf, scales, out, numel, lo, hi, block_size, k, low, vb, full_nbytes):
        """Elements [lo, hi) of the decoded vector into ``out``; returns 0, or -1 - block for a
        wrong count of offsets, or -(1 << 40) - block for an offset beyond its block."""
        levels = 1 << (vb - 1)
        top = np.float32(levels - 1)
        idx = np.empty(k, np.int64)
        for blk in range(lo // block_size, (hi + block_size - 1) // block_size):
            start = blk * block_size
            r = min(block_size, numel - start)
            a, z = max(lo, start), min(hi, start + r)
            out[a - lo:z - lo] = 0  # block by block: its values land in cache, not in memory
            kept = min(k, r)
            upper = kept + ((r - 1) >> low) + 1
            base = blk * full_nbytes
            c = 0
            for q in range((upper + 7) >> 3):  # the unary bitmap, a set bit at a time
                byte = np.int64(buf[base + q])
                if 8 * q + 8 > upper:
                    byte &= (1 << (upper - 8 * q)) - 1
                while byte:
                    p = 8 * q + _CTZ[byte & -byte]
                    if c < kept:
                        idx[c] = (p - c) << low
                    c += 1
                    byte &= byte - 1
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
