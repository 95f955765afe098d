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

Where the time goes: the block is read once, 16 keys a step, and the candidates (about
k + 30 of 4096 at 2%) are appended with LLVM's vector compress (``_gather16``, IR written
here: numba has no SIMD types; under AVX512 one ``vpcompressd`` per array, elsewhere
LLVM's generic expansion, ~16 scalar stores, so there steps with no candidate skip it);
``t`` is bisected on the candidates, 16 compares and a popcount a step (``_count16``),
the chosen are taken without branches, and the offsets' low bits and the value fields
are written through a 64-bit accumulator.

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
    from numba.core import cgutils
    from numba.extending import intrinsic

    _kernel = njit(cache=True, nogil=True)

    _V16 = ir.VectorType(ir.IntType(32), 16)

    def _is_int32_vector(*arrays):
        return all(isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 1 and a.layout == "C"
                   for a in arrays)

    class _IR16:
        """LLVM IR on 16 int32 lanes for the intrinsics below (numba has no SIMD types)."""

        def __init__(self, context, builder, signature, args):
            self.context, self.b, self.sig, self.args = context, builder, signature, args

        def ptr(self, k, i):
            """Pointer to 16 int32 of array argument ``k`` from element ``i`` (no bounds check)."""
            data = self.context.make_array(self.sig.args[k])(self.context, self.b, self.args[k]).data
            return self.b.bitcast(self.b.gep(data, [i]), _V16.as_pointer())

        def splat(self, value):
            one = self.b.insert_element(ir.Constant(_V16, ir.Undefined), value, ir.IntType(32)(0))
            return self.b.shuffle_vector(one, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, [0] * 16))

        def popcount(self, mask, count):
            """count + the set lanes of ``mask``."""
            i16 = ir.IntType(16)
            fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
            return self.b.add(count, self.b.zext(self.b.call(fn, [self.b.bitcast(mask, i16)]), count.type))

        def append(self, values, mask, k, count):
            """The lanes of ``values`` that ``mask`` sets, in order, to array argument ``k`` from
            element ``count`` (16 elements of room needed): LLVM's vector compress, one
            vpcompressd under AVX512, a generic expansion elsewhere."""
            fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(_V16, [_V16, mask.type, _V16]),
                                                "llvm.experimental.vector.compress.v16i32")
            self.b.store(self.b.call(fn, [values, mask, ir.Constant(_V16, ir.Undefined)]), self.ptr(k, count),
                         align=4)

    def _native_compress(context) -> bool:
        """Whether the target compiles a vector compress to one instruction (AVX512F); the
        target's features as numba sets them (a private attribute: without it, assume not)."""
        return "+avx512f" in getattr(context.codegen(), "_tm_features", "")

    @intrinsic
    def _gather16(typingctx, bits, start, first, g, cand, cand_idx, c):
        """The keys (``_key``) of the 16 int32 bit patterns ``bits[start:start + 16]``; those
        ``>= g`` are appended in order to ``cand[c:]``, their offsets ``first + i`` to
        ``cand_idx[c:]`` (both need 16 elements of room there); returns the new count."""
        if not _is_int32_vector(bits, cand, cand_idx):
            return None

        def codegen(context, builder, signature, args):
            v = _IR16(context, builder, signature, args)
            a = builder.and_(builder.load(v.ptr(0, args[1]), align=4), ir.Constant(_V16, [0x7FFFFFFF] * 16))
            inf = ir.Constant(_V16, [_INF_BITS] * 16)
            key = builder.select(builder.icmp_signed(">", a, inf), inf,
                                 builder.select(builder.icmp_signed("==", a, inf),
                                                ir.Constant(_V16, [_INF_BITS - 1] * 16), a))
            mask = builder.icmp_signed(">=", key, v.splat(args[3]))
            offsets = builder.add(v.splat(args[2]), ir.Constant(_V16, list(range(16))))
            if _native_compress(context):
                v.append(key, mask, 4, args[6])
                v.append(offsets, mask, 5, args[6])
            else:  # LLVM's expansion costs ~16 scalar stores: skip the ~2/3 of steps with none
                bits16 = builder.bitcast(mask, ir.IntType(16))
                with builder.if_then(builder.icmp_unsigned("!=", bits16, ir.IntType(16)(0)), likely=False):
                    v.append(key, mask, 4, args[6])
                    v.append(offsets, mask, 5, args[6])
            return v.popcount(mask, args[6])

        return types.intp(bits, types.intp, types.int32, types.int32, cand, cand_idx, types.intp), codegen

    @intrinsic
    def _count16(typingctx, cand, start, g):
        """How many of the 16 int32 ``cand[start:start + 16]`` are ``>= g``: one vector compare
        and a popcount (a plain loop over ~100 candidates would run most of them in its scalar
        remainder)."""
        if not _is_int32_vector(cand):
            return None

        def codegen(context, builder, signature, args):
            v = _IR16(context, builder, signature, args)
            mask = builder.icmp_signed(">=", builder.load(v.ptr(0, args[1]), align=4), v.splat(args[2]))
            return v.popcount(mask, ir.IntType(64)(0))

        return types.int64(cand, types.intp, types.int32), codegen

    @intrinsic
    def _keep16(typingctx, cand, cand_idx, start, t, idx, j):
        """Append to ``idx[j:]`` (16 elements of room) the offsets ``cand_idx[start:start + 16]``
        whose keys ``cand[...]`` are ``>= t``, in order; returns the new count."""
        if not _is_int32_vector(cand, cand_idx, idx):
            return None

        def codegen(context, builder, signature, args):
            v = _IR16(context, builder, signature, args)
            mask = builder.icmp_signed(">=", builder.load(v.ptr(0, args[2]), align=4), v.splat(args[3]))
            v.append(builder.load(v.ptr(1, args[2]), align=4), mask, 4, args[5])
            return v.popcount(mask, args[5])

        return types.intp(cand, cand_idx, types.intp, types.int32, idx, types.intp), codegen

    @njit(cache=True, nogil=True, inline="always")
    def _count_ge16(cand, c16, g):
        """How many of ``cand[:c16]`` (c16 a multiple of 16) are ``>= g``."""
        n = 0
        for i in range(0, c16, 16):
            n += _count16(cand, i, g)
        return n

    @njit(cache=True, nogil=True, inline="always")
    def _key(v):
        """The torch path's key ``|x|.nan_to_num(nan=inf)`` on int32 bits: NaN -> inf, inf -> the
        largest finite float (the order of non-negative floats is their bits' order)."""
        v &= np.int32(0x7FFFFFFF)
        return np.int32(_INF_BITS) if v > _INF_BITS else (np.int32(_INF_BITS - 1) if v == _INF_BITS else v)

    @_kernel
    def _candidates(bits, start, r, g, cand, cand_idx):
        """The keys of bits[start:start + r] that are ``>= g`` into ``cand`` (in order), their
        offsets into ``cand_idx``; returns how many (one pass, 16 elements a step)."""
        c = 0
        whole = r // 16 * 16
        for i in range(0, whole, 16):
            c = _gather16(bits, start + i, np.int32(i), g, cand, cand_idx, c)
        for i in range(whole, r):  # branchless: write every element, keep it when it counts
            v = _key(bits[start + i])
            cand[c] = v
            cand_idx[c] = i
            c += v >= g
        return c

    @_kernel
    def _top_k(bits, start, r, k, guess, cand, cand_idx, idx):
        """Offsets (increasing, into ``idx``, which has room for k + 16) of the k largest keys
        of ``bits[start:start + r]``, ties to the lower offset; returns the k-th largest
        key ``t``.

        ``guess`` (the previous block's ``t``) only sets the work: the candidates are the
        keys ``>=`` a bound a little under it, lowered (by factors of 4, to 0 at worst)
        until at least k are; every chosen key is a candidate, and the candidates keep the
        order of their offsets."""
        g = max(np.int32(0), guess - np.int32(1 << 19))  # about 0.96 x guess
        c = _candidates(bits, start, r, g, cand, cand_idx)
        drop = np.int32(1 << 21)  # then about 0.84 x, 0.5 x, and by factors of 4
        while c < k:
            g = max(np.int32(0), g - drop)
            c = _candidates(bits, start, r, g, cand, cand_idx)
            drop = np.int32(min(2 << 23, 4 * drop))
        top = g
        for i in range(c):
            top = max(top, cand[i])
        c16 = (c + 15) // 16 * 16
        for i in range(c, c16):  # (padding below every bound: keys are >= 0)
            cand[i] = -1
        lo, hi = g, top  # the largest lo with at least k candidates >= lo, by bisection
        while lo < hi:  # on the bit patterns: 16 counts a step; selects, not branches
            mid = np.int32(lo + ((hi - lo + 1) >> 1))
            enough = _count_ge16(cand, c16, mid) >= k
            lo, hi = (mid if enough else lo), (hi if enough else np.int32(mid - 1))
        t = np.int32(lo)
        if _count_ge16(cand, c16, t) == k:  # every tie at t is kept (the usual case)
            j = 0
            for i in range(0, c16, 16):
                j = _keep16(cand, cand_idx, i, t, idx, j)
            return t
        need = k - _count_ge16(cand, c16, np.int32(t + 1))  # ties at t to take, lowest offsets first
        j = 0
        for i in range(c):  # branchless: write every offset, keep the chosen
            v = cand[i]
            tie = v == t
            keep = (v > t) | (tie & (need > 0))
            idx[j] = cand_idx[i]
            j += keep
            need -= keep & tie
        return t

    @njit(cache=True, nogil=True, inline="always")
    def _put_fields(out, base, pos, values, count, nbits):
        """Write the ``nbits`` low bits of ``values[:count]``, one after the other, at bit ``pos``
        past byte ``base`` (the bits there are 0; those below ``pos`` in its byte are kept),
        through a 64-bit accumulator flushed 32 bits at a time (nbits <= 16)."""
        b = base + (pos >> 3)
        n = pos & 7
        acc = np.uint64(out[b])
        mask = (np.int64(1) << nbits) - 1
        for j in range(count):
            acc |= np.uint64(values[j] & mask) << np.uint64(n)
            n += nbits
            if n >= 32:
                for q in range(4):
                    out[b + q] = np.uint8(acc >> np.uint64(8 * q) & np.uint64(0xFF))
                acc >>= np.uint64(32)
                n -= 32
                b += 4
        for q in range((n + 7) >> 3):
            out[b + q] = np.uint8(acc >> np.uint64(8 * q) & np.uint64(0xFF))

    @_kernel
    def _sparse_encode(bits, out, scales, block_size, k, low, vb, full_nbytes):
        n = bits.size
        cand = np.empty(block_size + 16, np.int32)  # (+16: a vector store past the last kept)
        cand_idx = np.empty(block_size + 16, np.int32)
        t = np.int32(_INF_BITS)  # the previous block's k-th largest key: the next one's first guess
        idx = np.empty(k + 16, np.int32)  # (+16: the choice writes a vector past the last)
        fld = np.empty(k, np.int32)
        raw = np.empty(k, np.int32)  # the kept elements' bits, their |x| bits, and |x|
        absb = np.empty(k, np.int32)
        mag = absb.view(np.float32)
        cell = np.zeros(1, np.float32)
        cell_bits = cell.view(np.int32)
        levels = 1 << (vb - 1)
        top = np.float32(levels - 1)
        half, zero = np.float32(0.5), np.float32(0)
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            r = stop - start
            xb = bits[start:stop]
            kept = min(k, r)
            if r >= k:
                t = _top_k(bits, start, r, k, t, cand, cand_idx, idx)
            else:  # every element, then zero padding (which sets m to 0, or NaN)
                for i in range(r):
                    idx[i] = i
            # kept magnitudes; max/min with any NaN give the canonical NaN (as torch)
            hmax, hmin = np.int32(0), np.int32(0x7FFFFFFF)
            for j in range(kept):
                v = xb[idx[j]]
                raw[j] = v
                a = v & np.int32(0x7FFFFFFF)
                absb[j] = a
                hmax, hmin = max(hmax, a), min(hmin, a)
            nan = hmax > _INF_BITS
            if r < k:
                hmin = np.int32(0)
            cell_bits[0] = np.int32(_NAN_BITS) if nan else hmax
            s = cell[0]
            cell_bits[0] = np.int32(_NAN_BITS) if nan else hmin
            m = cell[0]
            step = (s - m) / top
            for j in range(kept):  # sign: x < 0 as a float (not -0.0, not a NaN)
                a = absb[j]
                fld[j] = np.int32((raw[j] < 0) & (a != 0) & (a <= _INF_BITS))
            if step > 0:  # (loops without branches: they vectorize)
                for j in range(kept):
                    w = np.floor((mag[j] - m) / step + half)
                    w = zero if w != w else w
                    w = zero if w < zero else w
                    w = top if w > top else w
                    fld[j] |= np.int32(w) << 1
            upper = kept + ((r - 1) >> low) + 1
            total = upper + kept * (low + vb)
            nbytes = (total + 7) // 8
            base = blk * full_nbytes
            out[base:base + nbytes] = 0
            for j in range(kept):
                p = (idx[j] >> low) + j
                out[base + (p >> 3)] |= np.uint8(1 << (p & 7))
            _put_fields(out, base, upper, idx, kept, low)
            _put_fields(out, base, upper + kept * low, fld, kept, vb)
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
