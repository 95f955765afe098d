"""The 2-bit dense codec (``int2``) and the sparse codec (``sparse``): fewer bits than fp4.

Both are lossy enough that they are meant to run with error feedback (dilo/fragments.py:
each worker keeps what its codec dropped and sends it with its next pseudo-gradient);
``sparse`` always does (`Codec.needs_error_feedback`), ``int2`` follows
``comm.error_feedback`` so that its effect can be measured (docs/codecs.md).

Byte layouts, for ``n`` elements, scales fp32 in native (little-endian) byte order:

- ``int2``: ``ceil(n/4)`` bytes of 2-bit codes, then ``ceil(n/b)`` fp32 scales (blocks of
  ``b`` elements, as int8). Element ``4j+i`` is bits ``2i, 2i+1`` of byte ``j`` (padding
  codes are 0). ``s`` is the block's root mean square, ``sqrt(sum(x**2) / b)`` summed in
  fp64 and rounded to fp32 (a short last block counts its missing elements as zeros, so
  zero padding changes nothing); code ``c = clamp(floor(x / s), -2, 1) + 2`` (fp32
  division; a block whose ``s`` is not ``> 0`` divides by 1; NaN codes as 0 would,
  ``c = 2``), decoded as ``(c - 1.5) * s``: the levels ``{-1.5, -0.5, 0.5, 1.5} * s``, a
  uniform grid of step ``s`` (near the best 4-level grid for Gaussian values, whose
  error is about 0.35 of the RMS; an absmax scale loses 0.59). Values beyond ``±2s``
  clamp to ``±1.5s``. No level is zero: error feedback carries what is lost.
- ``sparse`` (SparseLoCo-style top-k): blocks of ``b`` elements (``comm.sparse_block``);
  each keeps ``k = max(1, floor(density * b + 0.5))`` entries (a last, short block of
  ``r`` elements keeps ``k' = min(k, r)``): the ``k`` largest ``|x|``, ties to the lower
  index (NaN counts as +inf, and +inf as the largest finite float: ``nan_to_num``).
  A block's payload is a little-endian bit string (bit ``i``
  is bit ``i % 8`` of byte ``i // 8``), zero-padded to whole bytes. Its kept offsets
  ``o_0 < ... < o_{k'-1}`` (within the block) are Elias–Fano coded with
  ``l = bit_length(b // k) - 1`` low bits: first a bitmap of ``k' + ((r - 1) >> l) + 1``
  bits with bit ``(o_j >> l) + j`` set for every ``j`` (the high parts, in unary), then
  the ``l`` low bits of each ``o_j``, then each entry's ``vb``-bit value field
  (``vb`` = ``comm.value_bits``, 2, 4 or 8): bit 0 the sign (set when ``x < 0``), the
  other ``vb - 1`` bits the magnitude code ``q``. That is about ``2 + l + vb`` bits per
  kept entry (b = 4096, k = 82: 784 bits, where plain 12-bit offsets take 1148). After
  every block's payload, two fp32 per block: ``m`` (the smallest kept ``|x|``; 0 when
  the block has fewer than ``k`` elements) and ``s`` (the largest). With
  ``L = 2**(vb-1)`` levels and ``step = (s - m) / (L - 1)`` (fp32),
  ``q = clamp(floor((|x| - m) / step + 0.5), 0, L - 1)`` (0 when ``step`` is not ``> 0``
  or the result is NaN), decoded as ``±(m + q * step)`` (fp32, the product rounded
  first); every other element is 0. So the levels run linearly from the block's
  smallest kept magnitude to its largest, both exact. A block holding NaN or inf decodes
  its kept entries to non-finite values (the no-contribution marker stays a marker).
  The size is fixed by ``n``, which the exchange needs.

The sparse codec is exchanged by all-gather (``exchange = "gather"``, dilo/comm/gather.py):
an owner's mean of M sparse vectors is up to M times denser and could not be re-encoded
at the same density without a second loss. Both codecs run in torch (vectorized per
chunk of whole blocks) and, when numba is installed, as one-pass kernels
(dilo/int2_kernels.py, dilo/sparse_kernels.py) that give the same bytes; tests/test_codec_lowbit.py checks them
against a plain-Python reference of the rules above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dilo import codec_kernels, int2_kernels, sparse_kernels
from dilo.codec_base import (
    _CHUNK_NUMEL,
    Codec,
    _as,
    _BlockCodec,
    _blocks,
    _check_input,
    _check_out,
)
from dilo.options import check_sparse_options

__all__ = ["Int2", "Sparse"]

_INT2_LEVELS = torch.tensor([-1.5, -0.5, 0.5, 1.5])


class Int2(_BlockCodec):
    name = "int2"

    def _payload_nbytes(self, numel: int) -> int:
        return -(-numel // 4)

    def _scale(self, xb: torch.Tensor) -> torch.Tensor:
        """Per row of `xb` (zero-padded blocks), sqrt(sum(x**2) / b) in fp64, as fp32 (rows, 1)."""
        total = xb.double().square_().sum(dim=1, keepdim=True)
        return total.div_(self.block_size).sqrt_().float()

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n = x.numel()
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        if codec_kernels.BACKEND == "numba":
            int2_kernels.int2_encode(self, x, out)
            return out
        codec_kernels.warn_if_slow()
        codes = torch.zeros(self._payload_nbytes(n) * 4, dtype=torch.uint8)
        scales = torch.empty(self._num_blocks(n), dtype=torch.float32)
        work = self._scratch(torch.float32)
        for el, bl in self._chunks(n):
            xb = _blocks(x[el], self.block_size)
            w = work[: xb.shape[0]]
            scale = self._scale(xb)
            divisor = torch.where(scale > 0, scale, 1.0)
            torch.div(xb, divisor, out=w).nan_to_num_(nan=0.0).floor_().clamp_(-2, 1).add_(2)
            codes[el] = w.view(-1)[: el.stop - el.start]
            scales[bl] = scale.view(-1)
        c = codes.view(-1, 4)
        k = self._payload_nbytes(n)
        out[:k] = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
        out[k:] = scales.view(torch.uint8)
        return out

    def decode(self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _check_out(out, torch.float32, numel)
        if codec_kernels.BACKEND == "numba":
            int2_kernels.int2_decode(self, buf, numel, out)
            return out
        codec_kernels.warn_if_slow()
        packed, scale = self._split(buf, numel)
        codes = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)], dim=1).view(-1)[:numel]
        return self._decode_by_table(codes, _INT2_LEVELS, scale, numel, out)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        # s/2 on the grid, |x| - 1.5s beyond it, plus the fp32 rounding of x/s and (c - 1.5)*s.
        x = _check_input(x)
        s = self._scale(_blocks(x, self.block_size)).expand(-1, self.block_size).reshape(-1)[: x.numel()]
        return torch.maximum(s * 0.5, x.abs() - s * 1.5) + s * 2.0**-20 + 2.0**-140


@dataclass(frozen=True)
class Sparse(Codec):
    """Top-k per block with low-bit values (see the module docstring)."""

    name: ClassVar[str] = "sparse"
    needs_error_feedback: ClassVar[bool] = True
    block_size: int = 4096
    density: float = 0.02
    value_bits: int = 2
    exchange: str = "gather"  # type: ignore[misc]  (a setting here: comm.sparse_exchange)

    def __post_init__(self) -> None:
        check_sparse_options(self.density, self.value_bits, self.block_size, self.exchange)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def keep(self) -> int:
        """k: entries kept per full block."""
        return max(1, min(self.block_size, math.floor(self.density * self.block_size + 0.5)))

    @property
    def low_bits(self) -> int:
        """l: low bits of each offset sent as they are, l = floor(log2(b / k)) (Elias–Fano)."""
        return (self.block_size // self.keep).bit_length() - 1

    def _bits(self, elements: int) -> tuple[int, int, int]:
        """(kept entries, bits of the upper-half bitmap, payload bits) of a block of `elements`."""
        kept = min(self.keep, elements)
        upper = kept + ((elements - 1) >> self.low_bits) + 1
        return kept, upper, upper + kept * (self.low_bits + self.value_bits)

    def _block_nbytes(self, elements: int) -> int:
        """Payload bytes of a block of `elements` elements."""
        return -(-self._bits(elements)[2] // 8)

    def _layout(self, numel: int) -> tuple[int, int]:
        """(blocks, payload bytes) for `numel` elements."""
        full, rest = divmod(numel, self.block_size)
        payload = full * self._block_nbytes(self.block_size) + (self._block_nbytes(rest) if rest else 0)
        return full + (rest > 0), payload

    def encoded_nbytes(self, numel: int) -> int:
        blocks, payload = self._layout(numel)
        return payload + 8 * blocks

    def _rows(self, first: int, end: int):
        """Yield (first block, end block) over [first, end) in chunks of about 1M elements."""
        step = max(1, _CHUNK_NUMEL // self.block_size)
        for r0 in range(first, end, step):
            yield r0, min(r0 + step, end)

    # -- encode --------------------------------------------------------------------------
    def _select(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(offsets (R, k), value fields sign | q << 1 (R, k), m (R, 1), s (R, 1)) of the rows `xb`
        (zero-padded blocks), offsets increasing along each row."""
        k, levels = self.keep, 1 << (self.value_bits - 1)
        key = xb.abs().nan_to_num_(nan=math.inf)
        b = key.shape[1]  # the k-th largest of each row: numpy's introselect, ~8x torch.topk's speed
        kth = torch.from_numpy(np.partition(key.numpy(), b - k, axis=1)[:, b - k:b - k + 1])
        above = key > kth
        need = k - above.sum(dim=1, keepdim=True)
        tied = key == kth
        if bool((tied.sum(dim=1, keepdim=True) == need).all()):  # every tie is kept (the usual case)
            chosen = above | tied
        else:
            chosen = above | (tied & (tied.cumsum(dim=1) <= need))  # ties to the lower index
        idx = chosen.nonzero()[:, 1].view(-1, k)  # row-major: increasing index per row
        vals = xb.gather(1, idx)
        mag = vals.abs()
        s, m = mag.amax(dim=1, keepdim=True), mag.amin(dim=1, keepdim=True)  # NaN propagates
        step = (s - m) / (levels - 1)
        ok = step > 0
        q = ((mag - m) / torch.where(ok, step, 1.0) + 0.5).floor_().nan_to_num_(nan=0.0).clamp_(0, levels - 1)
        q = torch.where(ok, q, 0.0).long()
        return idx, (vals < 0).long() | (q << 1), m, s

    def _pack(self, idx: torch.Tensor, field: torch.Tensor, elements: int) -> torch.Tensor:
        """Rows of blocks of `elements` elements → (R, block bytes) uint8 (their first kept entries)."""
        kept, upper, total = self._bits(elements)
        idx, field = idx[:, :kept], field[:, :kept]
        rows, low, vb = idx.shape[0], self.low_bits, self.value_bits
        nbytes = -(-total // 8)
        bits = torch.zeros(rows, nbytes * 8, dtype=torch.uint8)
        bits.scatter_(1, (idx >> low) + torch.arange(kept), 1)  # entry j's high part, in unary
        if low:
            bits[:, upper:upper + kept * low] = ((idx.unsqueeze(-1) >> torch.arange(low)) & 1).view(rows, kept * low)
        bits[:, upper + kept * low:total] = ((field.unsqueeze(-1) >> torch.arange(vb)) & 1).view(rows, kept * vb)
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
        return (bits.view(rows, nbytes, 8).to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n, b, k = x.numel(), self.block_size, self.keep
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        if codec_kernels.BACKEND == "numba":
            sparse_kernels.sparse_encode(self, x, out)
            return out
        codec_kernels.warn_if_slow()
        blocks, payload = self._layout(n)
        scales = torch.empty(blocks, 2, dtype=torch.float32)
        full = self._block_nbytes(b)
        for r0, r1 in self._rows(0, blocks):
            idx, field, m, s = self._select(_blocks(x[r0 * b:min(r1 * b, n)], b))
            last = min(b, n - (r1 - 1) * b)  # elements of the chunk's last block
            if last < k:  # fewer elements than k: the missing ones count as zeros
                m[-1] = 0.0
            whole = r1 - r0 - (last < b)
            out[r0 * full:(r0 + whole) * full] = self._pack(idx[:whole], field[:whole], b).view(-1)
            if last < b:
                start = (r1 - 1) * full
                out[start:start + self._block_nbytes(last)] = self._pack(idx[-1:], field[-1:], last).view(-1)
            scales[r0:r1, 0:1], scales[r0:r1, 1:2] = m, s
        out[payload:] = scales.view(-1).view(torch.uint8)
        return out

    # -- decode --------------------------------------------------------------------------
    def _unpack(self, raw: torch.Tensor, elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, block bytes) of blocks of `elements` → (offsets, value fields), (R, kept) each."""
        kept, upper, total = self._bits(elements)
        rows, low, vb = raw.shape[0], self.low_bits, self.value_bits
        bits = ((raw.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(rows, raw.shape[1] * 8)
        ones = bits[:, :upper].nonzero()[:, 1]
        if ones.numel() != rows * kept:
            raise ValueError(f"sparse payload is malformed: {ones.numel()} offsets where {rows * kept} belong")
        idx = (ones.view(rows, kept) - torch.arange(kept)) << low
        if low:
            idx |= (bits[:, upper:upper + kept * low].view(rows, kept, low).long() << torch.arange(low)).sum(dim=-1)
        if rows and int(idx.max()) >= elements:
            raise ValueError(f"sparse payload is malformed: an offset beyond its block of {elements}")
        field = (bits[:, upper + kept * low:total].view(rows, kept, vb).long() << torch.arange(vb)).sum(dim=-1)
        return idx, field

    def decode(self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode_range(buf, numel, 0, numel, out)

    def decode_range(self, buf: torch.Tensor, numel: int, lo: int, hi: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [lo, hi) of ``decode(buf, numel)`` (``lo`` a multiple of the block size)."""
        if lo % self.block_size or not 0 <= lo <= hi <= numel:
            raise ValueError(f"decode_range needs a block-aligned lo and lo <= hi <= {numel}, got [{lo}, {hi})")
        buf = self._check_buf(buf, numel)
        out = _check_out(out, torch.float32, hi - lo)
        if codec_kernels.BACKEND == "numba":
            sparse_kernels.sparse_decode_range(self, buf, numel, lo, hi, out)
            return out
        codec_kernels.warn_if_slow()
        b, levels = self.block_size, 1 << (self.value_bits - 1)
        blocks, payload = self._layout(numel)
        scales = _as(buf[payload:], torch.float32).view(blocks, 2)
        full = self._block_nbytes(b)
        for r0, r1 in self._rows(lo // b, -(-hi // b)):
            last = min(b, numel - (r1 - 1) * b)
            whole = r1 - r0 - (last < b)
            dense = torch.zeros(r1 - r0, b, dtype=torch.float32)
            m, s = scales[r0:r1, 0:1], scales[r0:r1, 1:2]
            step = (s - m) / (levels - 1)
            parts = [(0, whole, self._unpack(buf[r0 * full:(r0 + whole) * full].view(whole, full), b))]
            if last < b:
                start = (r1 - 1) * full
                parts.append((whole, whole + 1, self._unpack(buf[start:start + self._block_nbytes(last)].view(1, -1),
                                                             last)))
            for a, z, (idx, field) in parts:
                mag = ((field >> 1).float() * step[a:z]).add_(m[a:z])
                dense[a:z].scatter_(1, idx, torch.where((field & 1).bool(), -mag, mag))
            first = r0 * b
            a, z = max(lo, first), min(hi, r1 * b)
            out[a - lo:z - lo] = dense.view(-1)[a - first:z - first]
        return out

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """The error itself (dropped elements lose all of |x|; kept ones at most step/2)."""
        x = _check_input(x)
        return (x - self.decode(self.encode(x), x.numel())).abs()

    def describe(self) -> str:
        return f"sparse (density {self.density:g}: {self.keep} of {self.block_size}, {self.value_bits}-bit values)"
