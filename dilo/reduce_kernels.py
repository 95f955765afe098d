"""One-pass numba kernels for the owner's side of the exchange and for screening a vector.

`dilo.aggregate` reduces each chunk's contributions in member order: decode member m's
bytes, drop them when not finite (or, for a cast codec, at its finite limit), add them
to the chunk's fp32 sum. The torch path does that in four passes over a decoded chunk
(decode, ``isfinite``, ``abs().max()``, ``+=``); the kernels here do exactly the same
float operations in fewer trips through memory:

- `max_abs`: max |x| in one pass without a temporary (finiteness and a cast codec's
  limit from the same bytes): an integer max over ``bits & 0x7fffffff`` (non-negative
  floats order like their bit patterns; any NaN makes it above inf's pattern).
- `add_into`: ``total = 0 + part`` (the first accepted contribution: ``0 + -0`` is
  ``+0``, as torch's zeroed sum gives) or ``total = total + part``, one fp32 add each.
- int8 and fp4 contributions are screened from their bytes and added without being
  decoded into memory: a decoded value is ``float32(q) * s`` (int8) or
  ``value[c] * s`` (fp4, ``|value| <= 1``), the fp32 products of `dilo.codecs`' decode.
  An fp4 block is finite exactly when its scale is (``0 * inf`` is NaN); an int8 block
  when its scale is and, if ``128 * s`` overflows, every product is finite
  (fp32 rounding is monotonic, ``|q| <= 128``).

tests/test_reduce_kernels.py checks every kernel bit for bit against the torch path on
edge values (zeros, ±0, subnormals, ±inf, NaN, all-equal blocks, huge scales). Without
numba (`codec_kernels.BACKEND == "torch"`) the callers run their torch code, which says
so once in the log (`codec_kernels.warn_if_slow`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dilo import codec_kernels
from dilo.codec_kernels import numba

__all__ = ["add_into", "fused_contribution", "max_abs"]

_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000


def _fast(x: torch.Tensor) -> bool:
    return (codec_kernels.BACKEND == "numba" and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous())


def max_abs(x: torch.Tensor) -> float:
    """max |x| as a Python float: NaN if any element is NaN, inf if any is ±inf (and none NaN),
    0.0 for an empty tensor. One pass without a temporary for a contiguous fp32 CPU tensor."""
    if x.numel() == 0:
        return 0.0
    if _fast(x):
        bits = int(_max_abs_bits(x.view(-1).numpy().view(np.int32)))
        return math.nan if bits > _INF_BITS else float(np.array(bits, np.int32).view(np.float32))
    codec_kernels.warn_if_slow()
    return float(x.detach().abs().max())


def add_into(total: torch.Tensor, part: torch.Tensor, first: bool) -> None:
    """total = 0 + part (`first`) or total + part, in fp32 (as torch's zeroed sum then ``+=``)."""
    if _fast(total) and _fast(part):
        _add(_np(part), _np(total), first)
        return
    if first:
        total.zero_()
    total += part


def fused_contribution(codec):
    """(screen, add) for `codec`'s encoded bytes when a one-pass kernel exists, else None.

    ``screen(buf, numel, count=numel)`` is True when the first `count` decoded values are
    finite (the blocks they lie in: a chunk's zero padding is not looked at); ``add(buf, total,
    first, divisor=None)`` adds the decoded values into ``total`` as `add_into` would add
    `codec.decode`'s output, and with `divisor` (the last contribution of a mean) divides each
    sum by it: ``fl(fl(t + v) / d)``, the bits of the add then torch's ``total.div_(d)`` (int8
    in the same pass; fp4 with that `div_`). Only scaled codecs (no finite limit to check) and
    only with numba.
    """
    if codec_kernels.BACKEND != "numba":
        return None
    name, block = getattr(codec, "name", None), getattr(codec, "block_size", None)
    if name == "int8":
        return (lambda buf, n, count=None: bool(_int8_finite(_np(buf), n, n if count is None else count, block)),
                lambda buf, total, first, divisor=None: _int8_add(_np(buf), _np(total), block, first,
                                                                  *_division(divisor)))
    if name == "fp4":
        return (lambda buf, n, count=None: bool(_fp4_finite(_np(buf), (n + 1) // 2,
                                                            -(-(n if count is None else count) // block))),
                lambda buf, total, first, divisor=None: _fp4_add_then_divide(_np(buf), total, block, first, divisor))
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _fp4_add_then_divide(buf: np.ndarray, total: torch.Tensor, block: int, first: bool, divisor: float | None) -> None:
    """fp4's add, then torch's `div_` for a mean's last contribution: fp4's table lookups do
    not vectorize, and a division in that loop cost more than the separate pass it saves
    (measured; int8 divides in its add)."""
    _fp4_add(buf, _np(total), block, first, _VALUES)
    if divisor is not None:
        total.div_(divisor)


def _division(divisor: float | None) -> tuple[bool, np.float32]:
    """(divide?, the divisor in fp32: what torch's `div_` by a Python number divides by)."""
    return divisor is not None, np.float32(1 if divisor is None else divisor)


if numba is not None:
    from dilo.codec_kernels import _VALUES, _get_scale, _kernel

    @_kernel
    def _max_abs_bits(bits):
        m = np.int32(0)
        for i in range(bits.size):
            m = max(m, np.int32(bits[i] & np.int32(_ABS_MASK)))
        return m

    @_kernel
    def _add(part, total, first):
        if first:
            zero = np.float32(0)
            for i in range(total.size):
                total[i] = zero + part[i]
        else:
            for i in range(total.size):
                total[i] = total[i] + part[i]

    @_kernel
    def _finite32(v):
        return abs(v) < np.float32(np.inf)

    @_kernel
    def _int8_finite(buf, n, count, block_size):
        q = buf[:count].view(np.int8)
        cell = np.zeros(1, np.float32)
        cell_bytes = cell.view(np.uint8)
        big = np.float32(128)
        for blk, start in enumerate(range(0, count, block_size)):
            scale = _get_scale(buf, n + 4 * blk, cell, cell_bytes)
            if not _finite32(scale):
                return False
            if not _finite32(big * scale):  # only a huge (hand-made) scale: check each product
                qb = q[start : start + block_size]
                for i in range(qb.size):
                    if not _finite32(np.float32(qb[i]) * scale):
                        return False
        return True

    @_kernel
    def _summed(prev, part, first, divide, divisor):
        """0 + part (`first`) or prev + part in fp32; then ÷ divisor when `divide` (an fp32 division)."""
        v = (np.float32(0) if first else prev) + part
        return v / divisor if divide else v

    @_kernel
    def _int8_add(buf, total, block_size, first, divide, divisor):
        n = total.size
        q = buf[:n].view(np.int8)
        cell = np.zeros(1, np.float32)
        cell_bytes = cell.view(np.uint8)
        for blk, start in enumerate(range(0, n, block_size)):
            scale = _get_scale(buf, n + 4 * blk, cell, cell_bytes)
            qb, tb = q[start : start + block_size], total[start : start + block_size]
            for i in range(qb.size):  # (the loop-invariant `first`, `divide` are hoisted by LLVM)
                tb[i] = _summed(tb[i], np.float32(qb[i]) * scale, first, divide, divisor)

    @_kernel
    def _fp4_finite(buf, payload, blocks):
        cell = np.zeros(1, np.float32)
        cell_bytes = cell.view(np.uint8)
        for blk in range(blocks):
            if not _finite32(_get_scale(buf, payload + 4 * blk, cell, cell_bytes)):
                return False
        return True

    @_kernel
    def _fp4_add(buf, total, block_size, first, values):
        n = total.size
        payload = (n + 1) // 2
        cell = np.zeros(1, np.float32)
        cell_bytes = cell.view(np.uint8)
        table = np.empty(16, np.float32)
        zero = np.float32(0)
        for blk, start in enumerate(range(0, n, block_size)):
            scale = _get_scale(buf, payload + 4 * blk, cell, cell_bytes)
            for c in range(16):
                table[c] = values[c] * scale
            tb = total[start : start + block_size]
            done = 0
            if start % 2 == 0:  # whole bytes: element 2j is byte j's low nibble, 2j + 1 its high one
                bb = buf[start >> 1 : (start >> 1) + tb.size // 2]
                for j in range(bb.size):
                    byte = bb[j]
                    tb[2 * j] = (zero if first else tb[2 * j]) + table[byte & 15]
                    tb[2 * j + 1] = (zero if first else tb[2 * j + 1]) + table[byte >> 4]
                done = 2 * bb.size
            for k in range(done, tb.size):  # an odd start (odd block sizes), an odd last element
                i = start + k
                code = (buf[i >> 1] >> ((i & 1) << 2)) & 15
                tb[k] = (zero if first else tb[k]) + table[code]
