"""The codec contract (`Codec`) and the blockwise layout the scaled codecs share.

dilo/codecs.py holds the wire formats and `get_codec`; dilo/codec_lowbit.py the 2-bit dense
and sparse codecs. Both build on the class and helpers here (CPU tensors in, bytes out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Codec"]

_CHUNK_NUMEL = 1 << 20


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu":
        raise ValueError(
            f"codecs take a 1-D fp32 CPU tensor, got dtype={x.dtype} "
            f"shape={tuple(x.shape)} device={x.device}"
        )
    return x.contiguous()


def _as(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a uint8 slice as ``dtype`` (copying if it is not aligned for a view)."""
    try:
        return buf.view(dtype)
    except RuntimeError:
        return buf.clone().view(dtype)


def _check_out(out: torch.Tensor | None, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """``out`` if it is a 1-D contiguous CPU tensor of ``numel`` x ``dtype``, else a new one."""
    if out is None:
        return torch.empty(numel, dtype=dtype)
    shape_ok = out.dim() == 1 and out.numel() == numel and out.is_contiguous()
    if out.dtype != dtype or not shape_ok or out.device.type != "cpu":
        raise ValueError(
            f"out= must be a contiguous 1-D {dtype} CPU tensor of {numel} elements, got "
            f"dtype={out.dtype} shape={tuple(out.shape)} device={out.device}"
        )
    return out


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` as ``(num_blocks, block_size)``, zero-padded at the end (padding is local only)."""
    pad = -x.numel() % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block_size)


@dataclass(frozen=True)
class Codec:
    """One wire format. Subclasses are immutable and stateless."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    needs_error_feedback: ClassVar[bool] = False
    """True when the codec drops so much that it runs only with error feedback (sparse)."""
    exchange: ClassVar[str] = "two_phase"
    """How a group averages with it: ``two_phase`` (owners re-encode their chunk's mean once,
    dilo/comm/protocol.py) or ``gather`` (every member decodes every member's bytes and reduces
    them in member order, dilo/comm/gather.py)."""
    block_size: int = 1  # elements per scale block

    def encoded_nbytes(self, numel: int) -> int:
        """Exact size of ``encode`` output for ``numel`` elements."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """1-D fp32 CPU tensor -> 1-D uint8 tensor of ``encoded_nbytes(x.numel())``.

        Written into ``out`` (contiguous uint8 of that size) when given, else a new tensor.
        """
        raise NotImplementedError

    def decode(
        self, buf: torch.Tensor, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``encode`` output -> 1-D fp32 tensor of ``numel`` (ValueError on a wrong size).

        Written into ``out`` (contiguous fp32 of ``numel``) when given, else a new tensor.
        """
        raise NotImplementedError

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per element, an upper bound on ``|decode(encode(x)) - x|`` (finite ``x``)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Encode and decode one small vector, and check it for finiteness, so that the kernels
        (numba's, loaded from its cache on first use: ~0.8 s) load at start-up, not inside the
        first round's exchange. No state: nothing it computes is kept."""
        from dilo.codec_kernels import all_finite

        x = torch.linspace(-1.0, 1.0, 4 * max(self.block_size, 64))
        self.decode(self.encode(x), x.numel())
        all_finite(x)

    def _check_buf(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        expected = self.encoded_nbytes(numel)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != expected:
            raise ValueError(
                f"{self.name} buffer for {numel} elements must be 1-D uint8 of {expected} "
                f"bytes, got dtype={buf.dtype} shape={tuple(buf.shape)}"
            )
        return buf.contiguous()




@dataclass(frozen=True)
class _BlockCodec(Codec):
    """Shared layout of the blockwise codecs: payload bytes, then fp32 scales.

    Work is done in chunks of whole blocks (about 1M elements) with scratch buffers
    reused across chunks; only the last, possibly short, block is padded (locally).
    """

    block_size: int = 256

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"{self.name} block_size must be >= 1, got {self.block_size}")

    def _num_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _payload_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def encoded_nbytes(self, numel: int) -> int:
        return self._payload_nbytes(numel) + 4 * self._num_blocks(numel)

    def _chunks(self, numel: int):
        """Yield (element slice, block slice) covering ``numel`` in whole blocks."""
        step = self._chunk_rows() * self.block_size
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            b0 = start // self.block_size
            yield slice(start, stop), slice(b0, b0 + self._num_blocks(stop - start))

    def _chunk_rows(self) -> int:
        return max(1, _CHUNK_NUMEL // self.block_size)

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """A (chunk rows, block_size) buffer, reused across chunks (no page faults)."""
        return torch.empty(self._chunk_rows(), self.block_size, dtype=dtype)

    def _split(self, buf: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._check_buf(buf, numel)
        k = self._payload_nbytes(numel)
        return buf[:k], _as(buf[k:], torch.float32)

    def _decode_by_table(self, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, numel: int,
                         out: torch.Tensor) -> torch.Tensor:
        """out = table[code] x its block's scale, chunk by chunk through reused buffers (the torch
        path of the table codecs: fp4's magnitudes, int2's levels)."""
        idx_work, val_work = self._scratch(torch.int64), self._scratch(torch.float32)
        for el, bl in self._chunks(numel):
            cb = _blocks(codes[el], self.block_size)
            idx, val = idx_work[: cb.shape[0]], val_work[: cb.shape[0]]
            idx.copy_(cb)
            torch.index_select(table, 0, idx.view(-1), out=val.view(-1))
            val.mul_(scale[bl, None])
            out[el] = val.view(-1)[: el.stop - el.start]
        return out
