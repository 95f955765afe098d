"""The outer optimizer's step: `torch.optim.SGD` (momentum, Nesterov) on a flat fp32 vector.

`sgd_step(param, opt, grad, live)` gives exactly the bytes of `opt.step()` with `grad` as
the gradient (θ and the momentum buffer; tests/test_outer_step_memory.py compares them
bit for bit, edge values included), and optionally writes the new θ into the live
model's parameters (`live`: (offset, fp32 CPU tensor) pieces of θ's layout) in the same
pass. torch does, per element, with m and lr rounded to fp32:

    buf ← g                                 (first step: a copy)
    buf ← fl(fl(buf·m) + g)                 (`buf.mul_(m).add_(g)`)
    look ← g + m·buf                        (`torch.add(g, buf, alpha=m)`)
    θ ← θ − lr·look                         (`θ.add_(look, alpha=-lr)`)

The last two are `a + α·b` with a scalar α, which torch's vectorized CPU kernels compute
as a fused multiply-add (one rounding) on CPUs that have one, and as a multiply then an
add (two) otherwise. `FUSED` is found once per process by asking torch itself; the numba
kernel then does the same (LLVM's `fma` intrinsic, or separate operations: numba never
contracts them on its own). One pass reads g, θ, buf and writes θ, buf and the live
parameter, instead of torch's three passes and a copy into the model.

`sgd_step_encoded` takes the gradient as the exchange's int8/fp4 bytes instead
(`comm.protocol.EncodedAverage`): `_DECODE_KERNEL` decodes 4096 elements at a time with
the codec's own decode kernel into a buffer that stays in cache and runs `_KERNEL` on
them, so the same values meet the same operations (tests/test_decode_step.py), and the
θ-sized fp32 average is never written or read back.

Without numba (`codec_kernels.BACKEND == "torch"`) the torch operations run, with the
look-ahead formed in 4 MiB pieces, and the log says so once (codec_kernels.warn_if_slow).
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from dilo import codec_kernels

_PIECE = 1 << 20  # elements of the Nesterov look-ahead formed at a time on the torch path (4 MiB)


def _check(opt: torch.optim.Optimizer) -> tuple[float, float, bool]:
    group = opt.param_groups[0]
    if group["weight_decay"] != 0 or group["dampening"] != 0 or group["maximize"]:
        raise ValueError("the outer optimizer is plain SGD with (Nesterov) momentum")
    return group["lr"], group["momentum"], group["nesterov"]


@torch.no_grad()
def sgd_step(param: torch.Tensor, opt: torch.optim.Optimizer, grad: torch.Tensor,
             live: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
    """`opt.step()` on the flat fp32 CPU `param` with `grad` as its gradient (the momentum stays
    in `opt.state[param]`); then each `live` piece (offset into `param`, contiguous fp32 CPU
    tensor) ← its slice of the new θ (in the same pass when the kernel runs)."""
    lr, m, nesterov = _check(opt)
    flat, g = param.view(-1), grad.view(-1)
    state = opt.state[param]
    buf = state.get("momentum_buffer")
    if m != 0 and codec_kernels.BACKEND == "numba" and _fused() is not None:
        first = buf is None
        if first:  # torch: buf ← a copy of g (the kernel writes it)
            buf = state["momentum_buffer"] = torch.empty_like(g)
        _run_kernel(flat, buf.view(-1), g, live, m, lr, nesterov, first)
        return
    _torch_step(flat, state, g, lr, m, nesterov)
    for offset, t in live:
        t.view(-1).copy_(flat[offset:offset + t.numel()])


def _torch_step(flat: torch.Tensor, state: dict, g: torch.Tensor, lr: float, m: float, nesterov: bool) -> None:
    """torch's SGD operations, the look-ahead `g + m·buf` in bounded pieces."""
    if codec_kernels.BACKEND != "numba":
        codec_kernels.warn_if_slow()
    if m == 0:
        flat.add_(g, alpha=-lr)
        return
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = g.detach().clone()
    else:
        buf.mul_(m).add_(g)
    if not nesterov:
        flat.add_(buf, alpha=-lr)
        return
    b = buf.view(-1)
    look = torch.empty(min(flat.numel(), _PIECE), dtype=flat.dtype)
    for lo in range(0, flat.numel(), _PIECE):
        hi = min(lo + _PIECE, flat.numel())
        step = torch.add(g[lo:hi], b[lo:hi], alpha=m, out=look[:hi - lo])
        flat[lo:hi].add_(step, alpha=-lr)


def _stretches(numel: int, live: Sequence[tuple[int, torch.Tensor]]):
    """(lo, hi, live elements [lo, hi) as a flat tensor, or None between live pieces: θ only)
    covering [0, numel) in order."""
    pos = 0
    for offset, t in sorted(live, key=lambda piece: piece[0]) + [(numel, None)]:
        if offset > pos:
            yield pos, offset, None
        if t is not None:
            pos = offset + t.numel()
            yield offset, pos, t.detach().view(-1)


def _run_kernel(flat, buf, g, live, m, lr, nesterov, first) -> None:
    m32, neg_lr, fused = np.float32(m), np.float32(-lr), _fused()
    for lo, hi, t in _stretches(flat.numel(), live):
        theta = flat[lo:hi].numpy()
        _KERNEL(theta, buf[lo:hi].numpy(), g[lo:hi].numpy(), theta if t is None else t.numpy(),
                m32, neg_lr, first, nesterov, fused)


_DECODED = {"int8": True, "fp4": False}  # codecs the decode-and-step kernel reads (True: int8)
_said_decoded: list = []


@torch.no_grad()
def sgd_step_encoded(param: torch.Tensor, opt: torch.optim.Optimizer, encoded,
                     live: Sequence[tuple[int, torch.Tensor]] = ()) -> bool:
    """`sgd_step(param, opt, encoded.decode_into(g), live)` without g: the kernel decodes each
    tile of the average's bytes (`comm.protocol.EncodedAverage`) into a small cache-resident
    buffer with the codec's own decode kernel, then runs `_KERNEL` on it — the same decoded
    values and the same operations, so the same bits, without writing and reading back a
    θ-sized fp32 average. False (nothing done; the log says so once) when the kernel cannot
    run here: no numba, no momentum, another codec, or torch's a + α·b of neither form."""
    lr, m, nesterov = _check(opt)
    codec = encoded.codec
    why = ("the numba kernels are off" if codec_kernels.BACKEND != "numba" else
           "outer momentum is 0" if m == 0 else
           f"the {codec.name} codec has no decode-and-step kernel" if codec.name not in _DECODED else
           "torch's a + α·b is of neither form" if _fused() is None else None)
    if why is not None:
        if not _said_decoded:  # (momentum 0 is a setting, not a fault: said at INFO)
            _said_decoded.append(why)
            codec_kernels.log.log(logging.INFO if m == 0 else logging.WARNING,
                                  "outer step: the average is decoded into memory before the step (%s)", why)
        return False
    flat = param.view(-1)
    state = opt.state[param]
    buf = state.get("momentum_buffer")
    first = buf is None
    if first:  # torch: buf ← a copy of g (the kernel writes it)
        buf = state["momentum_buffer"] = torch.empty_like(flat)
    m32, neg_lr, fused, b = np.float32(m), np.float32(-lr), _fused(), buf.view(-1)
    int8, block = _DECODED[codec.name], codec.block_size
    stretches = list(_stretches(flat.numel(), live))
    ends = [hi for _, hi, _ in stretches]
    for offset, count, n, codes in encoded.rows:
        raw = codes.numpy()
        for lo, hi, t in itertools.islice(stretches, bisect.bisect_right(ends, offset), None):  # the row's overlap with each
            if lo >= offset + count:  # live piece (or θ-only stretch) it meets
                break
            x0, x1 = max(lo, offset), min(hi, offset + count)
            theta = flat[x0:x1].numpy()
            _DECODE_KERNEL(raw, n, x0 - offset, int8, block, codec_kernels._VALUES, theta, b[x0:x1].numpy(),
                           theta if t is None else t[x0 - lo:x1 - lo].numpy(), m32, neg_lr, first, nesterov, fused)
    return True


_FUSED: list = []


def _fused() -> bool | None:
    """Whether torch's `a + α·b` is one rounding (FMA) here; None if it is neither form
    (then the torch path runs). Asked once per process on values where the two differ."""
    if not _FUSED:
        rng = np.random.default_rng(0)
        a = torch.from_numpy(rng.standard_normal(4099).astype(np.float32))
        b = torch.from_numpy(rng.standard_normal(4099).astype(np.float32))
        want = torch.add(a, b, alpha=0.9).numpy()
        x, y, alpha = a.numpy(), b.numpy(), np.float32(0.9)
        got = {f: np.empty_like(x) for f in (True, False)}
        for f, out in got.items():
            _AXPY(x, y, alpha, out, f)
        found = [f for f, out in got.items() if np.array_equal(out.view(np.int32), want.view(np.int32))]
        _FUSED.append(found[0] if len(found) == 1 else None)
        if _FUSED[0] is None:
            codec_kernels.log.warning("outer SGD kernel: torch's a + α·b matches neither a fused nor a plain "
                                      "multiply-add on this CPU; the outer step runs torch's operations")
    return _FUSED[0]


if codec_kernels.numba is not None:
    from numba import types
    from numba.core.extending import intrinsic

    from dilo.codec_kernels import _decode_range

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a·b + c with one rounding (LLVM's fma intrinsic)."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    @codec_kernels.njit(cache=True, nogil=True)
    def _madd(a, b, alpha, fused):
        """torch's a + α·b (see the module docstring)."""
        if fused:
            return _fma(b, alpha, a)
        return a + alpha * b

    @codec_kernels.njit(cache=True, nogil=True)
    def _AXPY(a, b, alpha, out, fused):
        for i in range(a.size):
            out[i] = _madd(a[i], b[i], alpha, fused)

    @codec_kernels.njit(cache=True, nogil=True)
    def _KERNEL(theta, buf, g, live, m, neg_lr, first, nesterov, fused):
        for i in range(theta.size):
            gi = g[i]
            b = gi if first else buf[i] * m + gi  # (separate roundings: numba does not contract)
            buf[i] = b
            step = _madd(gi, b, m, fused) if nesterov else b
            t = _madd(theta[i], step, neg_lr, fused)
            theta[i] = t
            live[i] = t


    _TILE = 4096  # elements decoded at a time by _DECODE_KERNEL (16 KiB: stays in L1)

    @codec_kernels.njit(cache=True, nogil=True)
    def _DECODE_KERNEL(codes, n, start, int8, block, values, theta, buf, live, m, neg_lr, first, nesterov,
                       fused):
        """`_KERNEL` with g = elements [start, start + theta.size) of the encoding `codes` of n
        elements, decoded a tile at a time by the codec's own kernel."""
        tile = np.empty(_TILE, np.float32)
        tile_bits = tile.view(np.int32)
        for lo in range(0, theta.size, _TILE):
            hi = min(lo + _TILE, theta.size)
            g = tile[:hi - lo]
            _decode_range(codes, n, start + lo, int8, block, values, g, tile_bits[:hi - lo])
            _KERNEL(theta[lo:hi], buf[lo:hi], g, live[lo:hi], m, neg_lr, first, nesterov, fused)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, not inside the first outer step."""
    if codec_kernels.BACKEND == "numba" and _fused() is not None:
        x = np.zeros(4, np.float32)
        _KERNEL(x, x.copy(), x.copy(), x.copy(), np.float32(0.9), np.float32(-0.7), False, True, _FUSED[0])
        _DECODE_KERNEL(np.zeros(8, np.uint8), 4, 0, True, 4, codec_kernels._VALUES, x, x.copy(), x.copy(),
                       np.float32(0.9), np.float32(-0.7), False, True, _FUSED[0])


def live_pieces(params: Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]] | None:
    """(offset in the flat vector, parameter) of each of `params` when every one is a contiguous
    fp32 CPU tensor (the kernel can write θ into them), else None."""
    pieces, offset = [], 0
    for p in params:
        if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
            return None
        pieces.append((offset, p))
        offset += p.numel()
    return pieces
