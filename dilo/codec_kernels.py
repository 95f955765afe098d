"""One-pass numba kernels for the int8 and fp4 codecs, and a one-pass finiteness check.

``dilo.codecs`` defines the wire formats and a torch implementation; these kernels give the
same bytes (tests/test_codec_kernels.py: both against an independent reference encoder) at
about a memcpy's cost: each block is read once into cache and its codes written in place.

Exactness, operation by operation, as the torch path does it:

- absmax is an integer max over ``bits & 0x7fffffff`` (non-negative floats order like
  their bit patterns). Any NaN in the block gives the canonical quiet NaN
  ``0x7fc00000``, which is what ``torch.amax`` returns whatever the NaN's payload.
- int8: ``s = absmax / 127`` and ``x / s`` are fp32 divisions (not a multiplication
  by a reciprocal); a block whose ``s`` is not ``> 0`` (zero or NaN) divides by 1;
  NaN codes to 0, values beyond ±127 clamp (clamping before ``rint`` is the same as
  after, since the bounds are integers); ``rint`` rounds half to even.
- fp4: the 7 thresholds are formed in float64 and rounded up to fp32 (see
  ``codecs._Fp4._thresholds``); the code is the number of thresholds ``<= |x|``; the
  sign bit is set when ``x <= -t_1``.
- decoding multiplies in fp32 (fp4: the 16 products ``value * s`` per block).

`sub_with_max_abs` / `sub_with_sumsq` form ``a - b`` (torch.sub's bytes) and, in the same
pass, max |d| or sums of squares: logged figures, never hashed or sent, summed in fp64 per
block of 4096 then over blocks (not torch.norm's bits); at T > 1 torch threads they run on T
slices of whole blocks (GIL released), with the same sums for any T.

numba is an optional extra (``pip install -e '.[fast]'``). Without it ``BACKEND`` is ``"torch"``,
``dilo.codecs`` runs its torch code, and the first use says so once in the log. ``DILO_CODEC_KERNELS=torch`` in the
environment, or ``use_backend("torch")``, forces the torch path (tests compare both).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["BACKEND", "NUMBA_VERSION", "all_finite", "sub_with_max_abs", "sub_with_sumsq", "use_backend",
           "warn_if_slow"]

log = logging.getLogger(__name__)

try:
    import numba
    from numba import njit
except ImportError:  # the optional "fast" extra is not installed
    numba = None

NUMBA_VERSION: str | None = numba.__version__ if numba is not None else None
# "numba" when the one-pass kernels run, "torch" when dilo.codecs uses its torch code.
BACKEND: str = "numba" if numba is not None else "torch"
if os.environ.get("DILO_CODEC_KERNELS", "") == "torch":
    BACKEND = "torch"

_warned = False
_STAT_BLOCK = 4096  # elements per partial sum of squares (sub_with_max_abs, sub_with_sumsq)
_PARALLEL_MIN = 1 << 20  # elements below which those kernels run on the calling thread only
_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count; a forked child starts its own
os.register_at_fork(after_in_child=_POOLS.clear)


def use_backend(name: str) -> None:
    """Select ``"numba"`` or ``"torch"`` for this process (tests compare the two)."""
    global BACKEND
    if name not in ("numba", "torch"):
        raise ValueError(f"codec kernel backend must be 'numba' or 'torch', got {name!r}")
    if name == "numba" and numba is None:
        raise ValueError("codec kernels: numba is not installed (pip install -e '.[fast]')")
    BACKEND = name


def warn_if_slow() -> None:
    """Say once per process that the torch path runs because numba is missing."""
    global _warned
    if numba is None and not _warned:
        _warned = True
        log.warning("codec kernels: numba not installed, using the torch path (pip install -e '.[fast]')")


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of the fp32 CPU tensor ``x`` is inf or NaN; one pass, exact."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return bool(torch.isfinite(x).all())
    if BACKEND == "numba":
        return bool(_all_finite(x.view(-1).numpy().view(np.int32)))
    warn_if_slow()
    return bool(torch.isfinite(x).all())


if numba is not None:
    _kernel = njit(cache=True, nogil=True)
    _FINITE_CHUNK = 1 << 16
    _CANONICAL_NAN = 0x7FC00000
    # fp4 rounding boundaries relative to the scale (as codecs._FP4_MIDPOINTS, float64)
    # and value of each nibble before scaling (as codecs._FP4_VALUES, fp32). They are
    # passed to the kernels as arguments, not read as constants: LLVM would fold
    # ``-1.0 * s`` into ``-s``, which flips a NaN's sign bit (torch multiplies).
    _MIDPOINTS = np.array([2.0**-7] + [1.5 * 2.0 ** (c - 8) for c in range(2, 8)])
    _VALUES = np.array(
        [0.0] + [2.0 ** (c - 7) for c in range(1, 8)] + [0.0] + [-(2.0 ** (c - 7)) for c in range(1, 8)],
        dtype=np.float32,
    )

    # Loops index slices from 0 (``for i in range(a.size)``): numba then knows the
    # index is not negative, drops its wraparound check, and LLVM vectorizes the loop.

    @_kernel
    def _all_finite(bits):
        # The max of |x|'s bit pattern is below inf's exactly when everything is finite.
        # Integer max vectorizes; checking per chunk stops early on a bad value.
        for start in range(0, bits.size, _FINITE_CHUNK):
            chunk = bits[start : start + _FINITE_CHUNK]
            m = np.int32(0)
            for i in range(chunk.size):
                m = max(m, np.int32(chunk[i] & np.int32(0x7FFFFFFF)))
            if m >= 0x7F800000:
                return False
        return True

    @_kernel
    def _absmax(bits, cell, cell_bits):
        """max |x| of a block (its int32 bits) as fp32; canonical NaN if any NaN (as torch.amax)."""
        m = np.int32(0)
        for i in range(bits.size):
            m = max(m, np.int32(bits[i] & np.int32(0x7FFFFFFF)))
        cell_bits[0] = np.int32(_CANONICAL_NAN) if m > 0x7F800000 else m
        return cell[0]

    @_kernel
    def _put_scale(out, offset, value, cell, cell_bytes):
        """Write the fp32 ``value`` at byte ``offset`` of ``out`` (maybe unaligned)."""
        cell[0] = value
        for k in range(4):
            out[offset + k] = cell_bytes[k]

    @_kernel
    def _get_scale(buf, offset, cell, cell_bytes):
        for k in range(4):
            cell_bytes[k] = buf[offset + k]
        return cell[0]

    @_kernel
    def _int8_encode(x, bits, out, block_size):
        n = x.size
        q = out[:n].view(np.int8)
        cell = np.zeros(1, np.float32)
        cell_bits, cell_bytes = cell.view(np.int32), cell.view(np.uint8)
        lo, hi, zero, one = np.float32(-127), np.float32(127), np.float32(0), np.float32(1)
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            scale = _absmax(bits[start:stop], cell, cell_bits) / np.float32(127)
            divisor = scale if scale > 0 else one
            xb, qb = x[start:stop], q[start:stop]
            for i in range(xb.size):
                w = xb[i] / divisor
                w = zero if w != w else w
                w = lo if w < lo else w
                w = hi if w > hi else w
                qb[i] = np.int8(np.rint(w))
            _put_scale(out, n + 4 * blk, scale, cell, cell_bytes)

    @_kernel
    def _int8_decode_range(buf, n, lo, out, block_size):
        """Elements [lo, lo + out.size) of the encoding of n elements in ``buf``, into ``out``."""
        q = buf[:n].view(np.int8)
        cell = np.zeros(1, np.float32)
        cell_bytes = cell.view(np.uint8)
        hi = lo + out.size
        i = lo
        while i < hi:
            blk = i // block_size
            stop = min((blk + 1) * block_size, hi)
            scale = _get_scale(buf, n + 4 * blk, cell, cell_bytes)
            qb, ob = q[i:stop], out[i - lo : stop - lo]
            for k in range(qb.size):
                ob[k] = np.float32(qb[k]) * scale
            i = stop

    @_kernel
    def _fp4_codes(xb, t, codes):
        """Nibbles of a block into ``codes``: how many thresholds ``<= |x|``, sign if x <= -t_1."""
        t0, t1, t2, t3, t4, t5, t6 = t[0], t[1], t[2], t[3], t[4], t[5], t[6]
        for i in range(xb.size):
            v = xb[i]
            a = abs(v)
            c = np.int32(0)
            c += a >= t0
            c += a >= t1
            c += a >= t2
            c += a >= t3
            c += a >= t4
            c += a >= t5
            c += a >= t6
            c += np.int32(8) if v <= -t0 else np.int32(0)
            codes[i] = c

    @_kernel
    def _fp4_encode(x, bits, out, block_size, midpoints):
        n = x.size
        payload = (n + 1) // 2
        cell = np.zeros(1, np.float32)
        cell_bits, cell_bytes = cell.view(np.int32), cell.view(np.uint8)
        t = np.empty(7, np.float32)
        codes = np.empty(block_size, np.int32)
        inf = np.float32(np.inf)
        for blk, start in enumerate(range(0, n, block_size)):
            stop = min(start + block_size, n)
            scale = _absmax(bits[start:stop], cell, cell_bits)
            for c in range(7):
                exact = np.float64(scale) * midpoints[c]
                cell[0] = np.float32(exact)
                if np.float64(cell[0]) < exact:  # round up: the next fp32 (exact >= 0, finite)
                    cell_bits[0] += 1
                t[c] = cell[0] if scale > 0 else inf
            m = stop - start
            _fp4_codes(x[start:stop], t, codes)
            k = 0
            if start % 2 == 1:  # high nibble of a byte the previous block began
                out[start // 2] |= np.uint8(codes[0] << 4)
                k = 1
            pairs = (m - k) // 2
            ob = out[(start + k) // 2 : (start + k) // 2 + pairs]
            cb = codes[k : k + 2 * pairs]
            for j in range(pairs):
                ob[j] = np.uint8(cb[2 * j] | (cb[2 * j + 1] << 4))
            if k + 2 * pairs < m:  # low nibble; the high one is the next block's (or zero at the end)
                out[(stop - 1) // 2] = np.uint8(codes[m - 1])
            _put_scale(out, payload + 4 * blk, scale, cell, cell_bytes)

    @_kernel
    def _fp4_pair_from_bits(byte, sbits):
        """Two decoded values (int32 bits) of a byte when ``s * 2**-6`` is a normal float.

        Then ``s * 2**(c-7)`` is exact, so subtracting ``7 - c`` from the exponent is
        the same number the table's fp32 product gives; code 0 is +0.
        """
        lo, hi = byte & 15, byte >> 4
        vlo = (sbits - ((7 - (lo & 7)) << 23)) | ((lo & 8) << 28)
        vhi = (sbits - ((7 - (hi & 7)) << 23)) | ((hi & 8) << 28)
        return (
            np.int32(0) if (lo & 7) == 0 else np.int32(vlo),
            np.int32(0) if (hi & 7) == 0 else np.int32(vhi),
        )

    @_kernel
    def _decode_range(buf, n, lo, int8, block_size, values, out, out_bits):
        """Elements [lo, lo + out.size) of the int8 (`int8`) or fp4 encoding of n elements."""
        if int8:
            _int8_decode_range(buf, n, lo, out, block_size)
        else:
            _fp4_decode_range(buf, n, lo, out, out_bits, block_size, values)

    @_kernel
    def _fp4_decode_range(buf, n, lo, out, out_bits, block_size, values):
        """Elements [lo, lo + out.size) of the encoding of n elements in ``buf``, into ``out``
        (``out_bits``: its int32 view)."""
        payload = (n + 1) // 2
        cell = np.zeros(1, np.float32)
        cell_bits, cell_bytes = cell.view(np.int32), cell.view(np.uint8)
        table = np.empty(16, np.float32)
        hi = lo + out.size
        i = lo
        while i < hi:
            blk = i // block_size
            stop = min((blk + 1) * block_size, hi)
            scale = _get_scale(buf, payload + 4 * blk, cell, cell_bytes)
            for c in range(16):
                table[c] = values[c] * scale
            if i % 2 == 1:
                out[i - lo] = table[buf[i // 2] >> 4]
                i += 1
            pairs = (stop - i) // 2
            bb = buf[i // 2 : i // 2 + pairs]
            sbits = cell_bits[0]
            if 0x03800000 <= sbits < 0x7F800000:  # finite, positive, s * 2**-6 normal
                obits = out_bits[i - lo : i - lo + 2 * pairs]
                for j in range(pairs):
                    obits[2 * j], obits[2 * j + 1] = _fp4_pair_from_bits(np.int32(bb[j]), sbits)
            else:  # zero, subnormal range, inf, NaN: the fp32 products themselves
                ob = out[i - lo : i - lo + 2 * pairs]
                for j in range(pairs):
                    byte = bb[j]
                    ob[2 * j] = table[byte & 15]
                    ob[2 * j + 1] = table[byte >> 4]
            i += 2 * pairs
            if i < stop:
                out[i - lo] = table[buf[i // 2] & 15]
                i += 1

    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def _block_sumsq(x):
        """Σ x² of a cache-hot block in fp64, vectorized (reassociated: a logged figure only)."""
        s = np.float64(0)
        for i in range(x.size):
            v = np.float64(x[i])
            s += v * v
        return s

    @_kernel
    def _sub_max_abs(a, b, out, out_bits, sums):
        """out = a - b; sums[k] = Σ out² of block k; returns max |out|'s bits (NaN above inf's)."""
        m = np.int32(0)
        for blk, start in enumerate(range(0, a.size, _STAT_BLOCK)):
            stop = min(start + _STAT_BLOCK, a.size)
            ab, bb, ob, ib = a[start:stop], b[start:stop], out[start:stop], out_bits[start:stop]
            for i in range(ab.size):
                ob[i] = ab[i] - bb[i]
            for i in range(ib.size):
                m = max(m, np.int32(ib[i] & np.int32(0x7FFFFFFF)))
            sums[blk] = _block_sumsq(ob)
        return m

    @_kernel
    def _sub_sumsq(a, b, out, sums_a, sums_out):
        for blk, start in enumerate(range(0, a.size, _STAT_BLOCK)):
            stop = min(start + _STAT_BLOCK, a.size)
            ab, bb, ob = a[start:stop], b[start:stop], out[start:stop]
            for i in range(ab.size):
                ob[i] = ab[i] - bb[i]
            sums_a[blk] = _block_sumsq(ab)
            sums_out[blk] = _block_sumsq(ob)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _fast(*tensors: torch.Tensor) -> bool:
    """The numba kernels run, and the tensors are contiguous fp32 CPU tensors of one size."""
    return BACKEND == "numba" and len({t.numel() for t in tensors}) == 1 and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _in_slices(n: int, run) -> list:
    """`run(lo, hi)` over [0, n) in slices of whole 4096-element blocks, on torch's thread count
    (the kernels release the GIL: a worker with several cores forms Δ as fast as torch's
    parallel ops did); one call below 1M elements or with one thread. Results in slice order."""
    threads = torch.get_num_threads()
    if threads <= 1 or n < _PARALLEL_MIN:
        return [run(0, n)]
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dilo-kernels")
    per_thread = -(-n // threads)
    step = -(-per_thread // _STAT_BLOCK) * _STAT_BLOCK
    return list(_POOLS[threads].map(lambda lo: run(lo, min(lo + step, n)), range(0, n, step)))


def _flat(*tensors: torch.Tensor) -> list[np.ndarray]:
    return [_np(t).reshape(-1) for t in tensors]


def sub_with_max_abs(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[float, float] | None:
    """``out = a - b`` (fp32, torch.sub's bytes) and, from the same pass, (max |out|: NaN if any
    element is NaN, inf if any is ±inf, as `reduce_kernels.max_abs`; the sum of squares of out,
    see the module docstring: per block, so the same value on any number of threads). None
    (nothing done) unless all three are contiguous fp32 CPU tensors of one size and the numba
    kernels run: the caller then runs torch."""
    if not _fast(a, b, out):
        return None
    an, bn, on = _flat(a, b, out)
    sums = np.empty(-(-on.size // _STAT_BLOCK))
    bits = max(_in_slices(on.size, lambda lo, hi: _sub_max_abs(
        an[lo:hi], bn[lo:hi], on[lo:hi], on[lo:hi].view(np.int32), sums[lo // _STAT_BLOCK:])), default=0)
    largest = math.nan if bits > 0x7F800000 else float(np.array(bits, np.int32).view(np.float32))
    return largest, float(sums.sum())


def sub_with_sumsq(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[float, float] | None:
    """``out = a - b`` (torch.sub's bytes) and (Σ a², Σ out²) from the same pass (module
    docstring); None when `sub_with_max_abs` would be."""
    if not _fast(a, b, out):
        return None
    an, bn, on = _flat(a, b, out)
    sums = np.empty((2, -(-on.size // _STAT_BLOCK)))
    _in_slices(on.size, lambda lo, hi: _sub_sumsq(an[lo:hi], bn[lo:hi], on[lo:hi], sums[0, lo // _STAT_BLOCK:],
                                                   sums[1, lo // _STAT_BLOCK:]))
    return float(sums[0].sum()), float(sums[1].sum())


def int8_encode(x: torch.Tensor, out: torch.Tensor, block_size: int) -> None:
    """Encode contiguous fp32 ``x`` into the uint8 ``out`` (``codecs`` checked both)."""
    xn = _np(x)
    _int8_encode(xn, xn.view(np.int32), _np(out), block_size)


def int8_decode(buf: torch.Tensor, out: torch.Tensor, block_size: int) -> None:
    _decode_range(_np(buf), out.numel(), 0, True, block_size, _VALUES, _np(out), _np(out).view(np.int32))


def fp4_encode(x: torch.Tensor, out: torch.Tensor, block_size: int) -> None:
    xn = _np(x)
    _fp4_encode(xn, xn.view(np.int32), _np(out), block_size, _MIDPOINTS)


def fp4_decode(buf: torch.Tensor, out: torch.Tensor, block_size: int) -> None:
    _decode_range(_np(buf), out.numel(), 0, False, block_size, _VALUES, _np(out), _np(out).view(np.int32))
