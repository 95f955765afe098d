"""Codecs: a flat fp32 pseudo-gradient to bytes for the wire, and back.

Every codec is a pure, deterministic function pair over CPU tensors: the same input
gives the same bytes, bit for bit, on every member (invariant 1 relies on it: the
owner of a chunk encodes it once and everyone decodes those bytes). Byte layouts,
for ``n`` elements and block size ``b`` (scales are fp32 in native byte order,
little-endian on every platform torch supports):

- ``fp32``: the ``4n`` raw bytes of the tensor. Lossless.
- ``bf16``: ``2n`` bytes of ``x.to(bfloat16)`` (round to nearest even). Values beyond
  the bf16 finite range are clamped to it first, so a finite input never becomes inf.
- ``fp16``: ``2n`` bytes of ``x.to(float16)`` after clamping to [-65504, 65504]
  (the fp16 finite range): 1e6 is sent as 65504, never as inf.
- ``int8``: ``n`` bytes of int8 codes ``q``, then ``ceil(n/b)`` fp32 scales. Block ``i``
  holds elements ``[i*b, (i+1)*b)``; the last block may be short (padding is never
  sent). ``s = absmax / 127``, ``q = clamp(round_half_even(x / s), -127, 127)``,
  decoded as ``q * s``. An all-zero block has ``s = 0`` and decodes to zeros.
- ``int2`` and ``sparse``: dilo/codec_lowbit.py.
- ``fp4`` (E3M0): ``ceil(n/2)`` bytes of nibbles, then ``ceil(n/b)`` fp32 scales
  ``s = absmax`` of each block. Element ``2j`` is the low nibble of byte ``j``,
  element ``2j+1`` the high nibble (zero if ``n`` is odd). Nibble = ``sign << 3 | c``;
  ``c = 0`` is zero (sign bit always 0), ``c = 1..7`` is ``±s * 2**(c - 7)``, i.e. the
  magnitudes ``{0, s/64, s/32, ..., s/2, s}``. Each ``|x|`` goes to the nearest
  magnitude in the linear domain, ties to the larger one (so ``|x| >= s/128`` never
  rounds to zero). Values equal to ``±s * 2**-k`` (k = 0..6) decode exactly.

Non-finite input never crashes ``encode``. With bf16/fp16/fp32 a NaN stays NaN and an
inf becomes the largest finite value (bf16/fp16) or stays inf (fp32). With int8/fp4 a
block holding an inf or NaN gets a non-finite scale, so its whole block decodes to
non-finite values. Callers must reject non-finite pseudo-gradients themselves
(``dilo.codec_kernels.all_finite`` checks in one pass).

``encode(x, out=buf)`` and ``decode(buf, numel, out=x)`` write into a preallocated
output (same bytes) so callers can reuse bounded buffers. int8 and fp4 run the one-pass
numba kernels of ``dilo.codec_kernels`` when numba is installed (``BACKEND``), else
the torch code below; both give exactly the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dilo import codec_kernels
from dilo.codec_base import Codec, _as, _BlockCodec, _blocks, _check_input, _check_out
from dilo.codec_lowbit import Int2, Sparse
from dilo.options import CODEC_NAMES

__all__ = ["CODEC_NAMES", "Codec", "get_codec"]

# fp4 value (before scaling) of each nibble: 0, 2**-6, ..., 2**0, then the negatives
# (nibble 8, "negative zero", is never produced and decodes to 0). 0 * inf is NaN, so a
# non-finite scale makes its whole block non-finite.
_FP4_VALUES = torch.tensor(
    [0.0] + [2.0 ** (c - 7) for c in range(1, 8)] + [0.0] + [-(2.0 ** (c - 7)) for c in range(1, 8)]
)
# Rounding boundaries of fp4 relative to the scale: s/128 (between 0 and s/64), then
# the midpoints 1.5 * 2**(c-8) between codes c-1 and c, for c = 2..7. float64 on purpose.
_FP4_MIDPOINTS = torch.tensor(
    [2.0**-7] + [1.5 * 2.0 ** (c - 8) for c in range(2, 8)], dtype=torch.float64
)
_CAST_CHUNK_NUMEL = 1 << 18  # 1 MiB of fp32 scratch: stays in cache, few python calls


@dataclass(frozen=True)
class _CastCodec(Codec):
    """Raw bytes of ``x`` cast to a float dtype (clamped to its finite range)."""

    dtype: ClassVar[torch.dtype]
    max_finite: ClassVar[float]
    half_ulp: ClassVar[float]  # relative rounding error: 2**-(significand bits)
    half_subnormal: ClassVar[float]  # absolute rounding error below the normal range

    def encoded_nbytes(self, numel: int) -> int:
        return numel * self.dtype.itemsize

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n = x.numel()
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        dst = _as(out, self.dtype)
        if self.lossless:
            dst.copy_(x)
        else:
            # Clamp a cache-sized piece into scratch, cast it into place: one trip
            # through memory. The same element-wise ops as on the whole tensor.
            work = torch.empty(min(n, _CAST_CHUNK_NUMEL), dtype=torch.float32)
            for start in range(0, n, _CAST_CHUNK_NUMEL):
                stop = min(start + _CAST_CHUNK_NUMEL, n)
                w = work[: stop - start]
                torch.clamp(x[start:stop], -self.max_finite, self.max_finite, out=w)
                dst[start:stop].copy_(w)
        if dst.data_ptr() != out.data_ptr():  # _as copied an unaligned out
            out.copy_(dst.view(torch.uint8))
        return out

    def decode(
        self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        buf = self._check_buf(buf, numel)
        return _check_out(out, torch.float32, numel).copy_(_as(buf, self.dtype))

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        if self.lossless:
            return torch.zeros_like(x)
        a = x.abs()
        return a * self.half_ulp + self.half_subnormal + (a - self.max_finite).clamp(min=0)


class _Fp32(_CastCodec):
    name, lossless, dtype = "fp32", True, torch.float32


class _Bf16(_CastCodec):
    name, dtype, max_finite = "bf16", torch.bfloat16, torch.finfo(torch.bfloat16).max
    half_ulp, half_subnormal = 2.0**-8, 2.0**-134


class _Fp16(_CastCodec):
    name, dtype, max_finite = "fp16", torch.float16, torch.finfo(torch.float16).max  # 65504
    half_ulp, half_subnormal = 2.0**-11, 2.0**-25


class _Int8(_BlockCodec):
    name = "int8"

    def _payload_nbytes(self, numel: int) -> int:
        return numel

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n = x.numel()
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        if codec_kernels.BACKEND == "numba":
            codec_kernels.int8_encode(x, out, self.block_size)
            return out
        codec_kernels.warn_if_slow()
        q_out = out[:n].view(torch.int8)
        scales = torch.empty(self._num_blocks(n), dtype=torch.float32)
        work = self._scratch(torch.float32)
        for el, bl in self._chunks(n):
            xb = _blocks(x[el], self.block_size)
            w = work[: xb.shape[0]]
            scale = torch.abs(xb, out=w).amax(dim=1, keepdim=True).div_(127)
            divisor = torch.where(scale > 0, scale, 1.0)
            torch.div(xb, divisor, out=w).round_().nan_to_num_(nan=0.0).clamp_(-127, 127)
            q_out[el] = w.view(-1)[: el.stop - el.start]
            scales[bl] = scale.view(-1)
        out[n:] = scales.view(torch.uint8)
        return out

    def decode(
        self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = _check_out(out, torch.float32, numel)
        if codec_kernels.BACKEND == "numba":
            codec_kernels.int8_decode(self._check_buf(buf, numel), out, self.block_size)
            return out
        codec_kernels.warn_if_slow()
        q, scale = self._split(buf, numel)
        q = q.view(torch.int8)
        work = self._scratch(torch.float32)
        for el, bl in self._chunks(numel):
            qb = _blocks(q[el], self.block_size)
            w = work[: qb.shape[0]]
            w.copy_(qb).mul_(scale[bl, None])
            out[el] = w.view(-1)[: el.stop - el.start]
        return out

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        # s/2 from rounding to the grid, plus fp32 rounding of x/s and q*s (each about
        # 127 * 2**-24 * s), plus an absolute term for subnormal scales.
        absmax = _blocks(x.abs(), self.block_size).amax(dim=1, keepdim=True)
        s = (absmax / 127).expand(-1, self.block_size).reshape(-1)[: x.numel()]
        return s * (0.5 + 2.0**-14) + 2.0**-140


class _Fp4(_BlockCodec):
    name = "fp4"

    def _payload_nbytes(self, numel: int) -> int:
        return -(-numel // 2)

    @staticmethod
    def _thresholds(scale: torch.Tensor) -> torch.Tensor:
        """Per block (rows), the 7 fp32 values t_c such that code >= c  <=>  |x| >= t_c.

        The exact midpoints s/128 and 1.5 * s * 2**(c-8) are formed in float64 and
        rounded *up* to fp32, so the fp32 comparison equals the exact one and ties go
        to the larger magnitude. An all-zero block gets +inf (everything codes to 0).
        """
        exact = scale.double() * _FP4_MIDPOINTS
        t = exact.float()
        t = torch.where(t.double() < exact, torch.nextafter(t, torch.tensor(math.inf)), t)
        return torch.where(scale > 0, t, math.inf)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x)
        n = x.numel()
        out = _check_out(out, torch.uint8, self.encoded_nbytes(n))
        if codec_kernels.BACKEND == "numba":
            codec_kernels.fp4_encode(x, out, self.block_size)
            return out
        codec_kernels.warn_if_slow()
        nib = torch.zeros(n + n % 2, dtype=torch.uint8)
        scales = torch.empty(self._num_blocks(n), dtype=torch.float32)
        a_work = self._scratch(torch.float32)
        code_work, hit_work = self._scratch(torch.uint8), self._scratch(torch.bool)
        for el, bl in self._chunks(n):
            xb = _blocks(x[el], self.block_size)
            k = xb.shape[0]
            a, code, hit = a_work[:k], code_work[:k], hit_work[:k]
            scale = torch.abs(xb, out=a).amax(dim=1, keepdim=True)
            t = self._thresholds(scale)
            code.zero_()
            for c in range(7):
                code.add_(torch.ge(a, t[:, c : c + 1], out=hit))
            # Sign bit only for nonzero codes: x <= -t_1 is "negative and code >= 1".
            code.add_(torch.le(xb, -t[:, :1], out=hit), alpha=8)
            nib[el] = code.view(-1)[: el.stop - el.start]
            scales[bl] = scale.view(-1)
        k = self._payload_nbytes(n)
        torch.bitwise_or(nib[0::2], nib[1::2] << 4, out=out[:k])
        out[k:] = scales.view(torch.uint8)
        return out

    def decode(
        self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = _check_out(out, torch.float32, numel)
        if codec_kernels.BACKEND == "numba":
            codec_kernels.fp4_decode(self._check_buf(buf, numel), out, self.block_size)
            return out
        codec_kernels.warn_if_slow()
        packed, scale = self._split(buf, numel)
        nib = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
        return self._decode_by_table(nib, _FP4_VALUES, scale, numel, out)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        # Exactly the distance from |x| to the nearest representable magnitude, with
        # the magnitudes formed as the decoder forms them (s * 2**(c-7) in fp32). Both
        # differences are exact in fp32 for the neighbours (Sterbenz). For |x| in
        # [m, 2m] this is <= m/2; below s/64 it is <= s/128.
        x = _check_input(x)
        out = torch.empty_like(x)
        for el, _ in self._chunks(x.numel()):
            a = _blocks(x[el].abs(), self.block_size)
            mags = a.amax(dim=1, keepdim=True) * _FP4_VALUES[:8]  # (blocks, 8), mags[:, 0] = 0
            lo_code = torch.searchsorted(mags[:, 1:].contiguous(), a, right=True)
            lo = mags.gather(1, lo_code)
            hi = mags.gather(1, (lo_code + 1).clamp_(max=7))
            err = torch.minimum(a - lo, (hi - a).abs())
            out[el] = err.view(-1)[: el.stop - el.start]
        return out


_CODECS: dict[str, type[Codec]] = {c.name: c for c in (_Fp32, _Bf16, _Fp16, _Int8, _Fp4, Int2, Sparse)}
assert tuple(_CODECS) == CODEC_NAMES


def get_codec(name: str, block_size: int = 256, *, density: float = 0.02, value_bits: int = 2,
              sparse_block: int = 4096, sparse_exchange: str = "gather") -> Codec:
    """The codec called ``name``; ``block_size`` applies to int8, fp4 and int2, the keywords
    to sparse (``comm.density``, ``comm.value_bits``, ``comm.sparse_block``, ``comm.sparse_exchange``)."""
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    cls = _CODECS[name]
    if cls is Sparse:
        return Sparse(block_size=sparse_block, density=density, value_bits=value_bits, exchange=sparse_exchange)
    return cls(block_size=block_size) if issubclass(cls, _BlockCodec) else cls()
