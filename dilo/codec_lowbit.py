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
  ``r`` elements keeps ``min(k, r)``): the ``k`` largest ``|x|``, ties to the lower
  index (NaN counts as +inf). Per block the payload is the kept entries in increasing
  index order, each ``ib + vb`` bits, little-endian bit order, packed from bit 0 of the
  block's first byte and zero-padded to a whole byte: ``ib = max(1, bit_length(b - 1))``
  bits of offset within the block, one sign bit (set when ``x < 0``), then ``vb - 1``
  bits of magnitude code ``q`` (``vb`` = ``comm.value_bits``, 2, 4 or 8). After every
  block's payload, two fp32 per block: ``m`` (the smallest kept ``|x|``; 0 when the
  block has fewer than ``k`` elements) and ``s`` (the largest). With ``L = 2**(vb-1)``
  levels and ``step = (s - m) / (L - 1)`` (fp32), ``q = clamp(floor((|x| - m) / step
  + 0.5), 0, L - 1)`` (0 when ``step`` is not ``> 0`` or the result is NaN), decoded as
  ``±(m + q * step)`` (fp32, the product rounded first); every other element is 0. So
  the levels run linearly from the block's smallest kept magnitude to its largest, both
  exact. A block holding NaN or inf decodes its kept entries to non-finite values (the
  no-contribution marker stays a marker). The size is fixed by ``n``, which the
  exchange needs.

The sparse codec is exchanged by all-gather (``exchange = "gather"``, dilo/comm/gather.py):
an owner's mean of M sparse vectors is up to M times denser and could not be re-encoded
at the same density without a second loss. Both codecs run in torch (vectorized per
chunk of whole blocks); tests/test_codec_lowbit.py checks them against a plain-Python
reference of the rules above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dilo.codec_base import _CHUNK_NUMEL, Codec, _as, _BlockCodec, _blocks, _check_input, _check_out
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
        packed, scale = self._split(buf, numel)
        codes = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)], dim=1).view(-1)[:numel]
        idx_work, val_work = self._scratch(torch.int64), self._scratch(torch.float32)
        for el, bl in self._chunks(numel):
            cb = _blocks(codes[el], self.block_size)
            idx, val = idx_work[: cb.shape[0]], val_work[: cb.shape[0]]
            idx.copy_(cb)
            torch.index_select(_INT2_LEVELS, 0, idx.view(-1), out=val.view(-1))
            val.mul_(scale[bl, None])
            out[el] = val.view(-1)[: el.stop - el.start]
        return out

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
    exchange: ClassVar[str] = "gather"
    block_size: int = 4096
    density: float = 0.02
    value_bits: int = 2

    def __post_init__(self) -> None:
        check_sparse_options(self.density, self.value_bits, self.block_size)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def keep(self) -> int:
        """k: entries kept per full block."""
        return max(1, min(self.block_size, math.floor(self.density * self.block_size + 0.5)))

    @property
    def index_bits(self) -> int:
        return max(1, (self.block_size - 1).bit_length())

    @property
    def entry_bits(self) -> int:
        return self.index_bits + self.value_bits

    def _block_nbytes(self, elements: int) -> int:
        """Payload bytes of a block of `elements` elements."""
        return -(-min(self.keep, elements) * self.entry_bits // 8)

    def _layout(self, numel: int) -> tuple[int, int]:
        """(blocks, payload bytes) for `numel` elements."""
        full, rest = divmod(numel, self.block_size)
        payload = full * self._block_nbytes(self.block_size) + (self._block_nbytes(rest) if rest else 0)
        return full + (rest > 0), payload

    def encoded_nbytes(self, numel: int) -> int:
        blocks, payload = self._layout(numel)
        return payload + 8 * blocks

    def _rows(self, numel: int):
        """Yield (first block, end block) covering `numel` in chunks of about 1M elements."""
        blocks, _ = self._layout(numel)
        step = max(1, _CHUNK_NUMEL // self.block_size)
        for r0 in range(0, blocks, step):
            yield r0, min(r0 + step, blocks)

    # -- encode --------------------------------------------------------------------------
    def _select(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(entries (R, k) int64, m (R, 1), s (R, 1)) of the rows `xb` (zero-padded blocks)."""
        k, ib, levels = self.keep, self.index_bits, 1 << (self.value_bits - 1)
        key = xb.abs().nan_to_num_(nan=math.inf)
        kth = key.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        above = key > kth
        need = k - above.sum(dim=1, keepdim=True)
        tied = key == kth
        chosen = above | (tied & (tied.cumsum(dim=1) <= need))  # ties to the lower index
        idx = chosen.nonzero()[:, 1].view(-1, k)  # row-major: increasing index per row
        vals = xb.gather(1, idx)
        mag = vals.abs()
        s, m = mag.amax(dim=1, keepdim=True), mag.amin(dim=1, keepdim=True)  # NaN propagates
        step = (s - m) / (levels - 1)
        ok = step > 0
        q = ((mag - m) / torch.where(ok, step, 1.0) + 0.5).floor_().nan_to_num_(nan=0.0).clamp_(0, levels - 1)
        q = torch.where(ok, q, 0.0).long()
        entries = idx | ((vals < 0).long() << ib) | (q << (ib + 1))
        return entries, m, s

    def _pack(self, entries: torch.Tensor, kept_last: int) -> torch.Tensor:
        """(R, k) entries → (R, block bytes) uint8; the last row keeps only `kept_last` entries."""
        rows, k = entries.shape
        eb = self.entry_bits
        nbytes = self._block_nbytes(self.block_size)
        bits = ((entries.unsqueeze(-1) >> torch.arange(eb)) & 1).to(torch.uint8).view(rows, k * eb)
        bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - k * eb))
        bits[-1, kept_last * eb:] = 0
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
        return (bits.view(rows, nbytes, 8).to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n, b = x.numel(), self.block_size
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        blocks, payload = self._layout(n)
        scales = torch.empty(blocks, 2, dtype=torch.float32)
        full = self._block_nbytes(b)
        for r0, r1 in self._rows(n):
            lo, hi = r0 * b, min(r1 * b, n)
            entries, m, s = self._select(_blocks(x[lo:hi], b))
            short = hi - (r1 - 1) * b  # elements of the chunk's last block
            if short < self.keep:  # fewer elements than k: the missing ones count as zeros
                m[-1] = 0.0
            packed = self._pack(entries, min(self.keep, short)).view(-1)
            start = r0 * full
            count = (r1 - r0 - 1) * full + self._block_nbytes(short)
            out[start:start + count] = packed[:count]
            scales[r0:r1, 0:1], scales[r0:r1, 1:2] = m, s
        out[payload:] = scales.view(-1).view(torch.uint8)
        return out

    # -- decode --------------------------------------------------------------------------
    def decode(self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode_range(buf, numel, 0, numel, out)

    def decode_range(self, buf: torch.Tensor, numel: int, lo: int, hi: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [lo, hi) of ``decode(buf, numel)`` (``lo`` a multiple of the block size)."""
        if lo % self.block_size or not 0 <= lo <= hi <= numel:
            raise ValueError(f"decode_range needs a block-aligned lo and lo <= hi <= {numel}, got [{lo}, {hi})")
        buf = self._check_buf(buf, numel)
        out = _check_out(out, torch.float32, hi - lo)
        if hi == lo:
            return out
        b, k, eb, ib = self.block_size, self.keep, self.entry_bits, self.index_bits
        levels = 1 << (self.value_bits - 1)
        blocks, payload = self._layout(numel)
        scales = _as(buf[payload:], torch.float32).view(blocks, 2)
        full = self._block_nbytes(b)
        weights = torch.tensor([1 << i for i in range(eb)], dtype=torch.int64)
        step_rows = max(1, _CHUNK_NUMEL // b)
        for r0 in range(lo // b, -(-hi // b), step_rows):
            r1 = min(r0 + step_rows, -(-hi // b))
            rows = r1 - r0
            raw = buf[r0 * full:min(r1 * full, payload)]
            if raw.numel() < rows * full:  # the numel's short last block
                raw = torch.nn.functional.pad(raw, (0, rows * full - raw.numel()))
            bits = (raw.view(rows, full, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
            entries = (bits.view(rows, full * 8)[:, :k * eb].view(rows, k, eb).long() * weights).sum(dim=-1)
            idx = entries & ((1 << ib) - 1)
            q = (entries >> (ib + 1)).float()
            m, s = scales[r0:r1, 0:1], scales[r0:r1, 1:2]
            mag = (q * ((s - m) / (levels - 1))).add_(m)
            vals = torch.where(((entries >> ib) & 1).bool(), -mag, mag)
            dense = torch.zeros(rows, b, dtype=torch.float32)
            last = min(b, numel - (r1 - 1) * b)  # elements in the chunk's last block
            kept = min(k, last)
            dense[:-1].scatter_(1, idx[:-1], vals[:-1])
            dense[-1].scatter_(0, idx[-1, :kept], vals[-1, :kept])
            a, z = max(lo, r0 * b), min(hi, r1 * b)
            out[a - lo:z - lo] = dense.view(-1)[a - r0 * b:z - r0 * b]
        return out

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """The error itself (dropped elements lose all of |x|; kept ones at most step/2)."""
        x = _check_input(x)
        return (x - self.decode(self.encode(x), x.numel())).abs()

    def describe(self) -> str:
        return f"sparse (density {self.density:g}: {self.keep} of {self.block_size}, {self.value_bits}-bit values)"
