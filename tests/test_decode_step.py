"""The outer step read straight from the exchange's bytes (docs/results.md, "Eighth pass").

`outer_sgd.sgd_step_encoded` decodes the gathered int8/fp4 average a tile at a time inside
the Nesterov kernel. Here it is compared bit for bit with an independent reference — the
codec's format decoded with torch operations from the bytes, then torch's SGD operations
written out — on edge cases (zeros, all-equal blocks, ±inf and NaN scales, sizes that are
not a multiple of the block, a partial last block, rows cut short by the padding, live
pieces that split blocks), and DiLoCo is checked to take that path (a counter on the
kernel) and to reach the same state as with the decoded average.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dilo import codec_error_sums, codec_kernels, outer_sgd
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from dilo.comm.protocol import EncodedAverage
from dilo.comm.two_phase import two_phase_average
from tests.helpers import diloco_pair, numba_skip, run_workers

NO_NUMBA, needs_numba = numba_skip("the decode-and-step kernel does not exist without it, the outer step "
                                   "decodes the average first")
LR, MOMENTUM = 0.7, 0.9


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.int32)


# -- an independent reference: the format decoded with torch, then SGD's operations ----------
def _scales(codes: torch.Tensor, at: int, blocks: int) -> torch.Tensor:
    return codes[at:at + 4 * blocks].clone().view(torch.float32)


def _reference_decode(name: str, codes: torch.Tensor, n: int, block: int) -> torch.Tensor:
    blocks = -(-n // block)
    if name == "int8":
        q = codes[:n].view(torch.int8).to(torch.float32)
        s = _scales(codes, n, blocks).repeat_interleave(block)[:n]
        return q * s
    payload = (n + 1) // 2
    nibbles = torch.stack([codes[:payload] & 15, codes[:payload] >> 4], dim=1).reshape(-1)[:n].long()
    values = torch.tensor([0.0] + [2.0 ** (c - 7) for c in range(1, 8)] + [0.0] + [-(2.0 ** (c - 7)) for c in range(1, 8)],
                          dtype=torch.float32)
    s = _scales(codes, payload, blocks).repeat_interleave(block)[:n]
    return values[nibbles] * s


def _reference_step(theta, buf, g, nesterov):
    """torch's SGD with momentum, written out (buf None: the first step)."""
    buf = g.clone() if buf is None else buf.mul(MOMENTUM).add(g)
    look = torch.add(g, buf, alpha=MOMENTUM) if nesterov else buf
    return theta.add(look, alpha=-LR), buf


def _encoding(name: str, n: int, block: int, case: str, seed: int) -> torch.Tensor:
    """Bytes of an encoding of n elements: the codec's own for `case` values, then scales edited."""
    codec = get_codec(name, block)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
    if case == "zeros":
        x.zero_()
    elif case == "equal":
        x.fill_(-0.37)
    codes = codec.encode(x).clone()
    at = n if name == "int8" else (n + 1) // 2
    scales = codes[at:].clone().view(torch.float32)  # (unaligned in the bytes)
    if case == "specials" and scales.numel() >= 4:  # what a hand-made or overflowing scale gives
        scales[0], scales[1], scales[2] = float("inf"), float("nan"), 0.0
        scales[3] = 1e-40  # subnormal: fp4's products leave the bit trick's range
    if case == "huge" and name == "int8":
        scales[0] = 3e38  # 128 · s overflows: products of large codes are ±inf
    codes[at:] = scales.view(torch.uint8)
    return codes


@needs_numba
@pytest.mark.parametrize("name", ["int8", "fp4"])
@pytest.mark.parametrize("case", ["random", "zeros", "equal", "specials", "huge"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_decode_and_step_matches_decode_then_sgd(name, case, nesterov, backend):
    backend("numba")
    block = 32
    n = 5 * block + 7  # each row: a partial last block
    numel = 3 * n - 50  # three rows, the last cut short (the exchange's zero padding)
    rows = []
    for k, offset in enumerate(range(0, numel, n)):
        rows.append((offset, min(n, numel - offset), n, _encoding(name, n, block, case, seed=k)))
    encoded = EncodedAverage(get_codec(name, block), rows)
    g = torch.cat([_reference_decode(name, codes, n, block)[:count] for _, count, n, codes in rows])
    # the reference decode agrees with the codec's (its torch path) before it is trusted
    assert np.array_equal(_bits(g), _bits(encoded.decode_into(torch.empty(numel))))

    theta0 = torch.randn(numel, generator=torch.Generator().manual_seed(9))
    param = torch.nn.Parameter(theta0.clone(), requires_grad=False)
    opt = torch.optim.SGD([param], lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    # live pieces that split blocks and rows, with θ-only stretches between them
    cuts = [(3, 40), (45, 1), (46, n + 9), (2 * n + 1, numel - 2 * n - 1)]
    live = [(offset, torch.empty(size)) for offset, size in cuts]
    want_theta, want_buf = theta0, None
    for step in range(2):  # the first step (momentum ← g) and a later one
        assert outer_sgd.sgd_step_encoded(param, opt, encoded, live)
        want_theta, want_buf = _reference_step(want_theta, want_buf, g, nesterov)
        assert np.array_equal(_bits(param.detach()), _bits(want_theta)), step
        assert np.array_equal(_bits(opt.state[param]["momentum_buffer"]), _bits(want_buf)), step
        for offset, t in live:
            assert np.array_equal(_bits(t), _bits(want_theta[offset:offset + t.numel()])), (step, offset)


@needs_numba
@pytest.mark.parametrize("name", ["int8", "fp4"])
@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("owner_error", [True, False])
def test_kept_bytes_decode_to_the_exchanged_average(name, pieces, owner_error, backend, monkeypatch):
    """`keep_encoded`: the same finiteness, codec_error and owner error, and bytes that decode
    to exactly the average the exchange writes without it; without the owner error asked for,
    codec_error is read off the owner's bytes (dilo/codec_error_sums.py), the same bits."""
    backend("numba")
    members, numel = 3, 10_000 + 37  # not a multiple of the members' chunks: padding
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(members)]
    got, calls = {}, []
    read = codec_error_sums.from_bytes
    monkeypatch.setattr(codec_error_sums, "from_bytes", lambda *a: calls.append(1) or read(*a))
    for keep in (False, True):
        groups = local_groups(members)

        def run(r, groups=groups, keep=keep):
            g = groups[r]
            return two_phase_average(xs[r], get_codec(name, 64), r, members, g._all_to_all, g._all_gather,
                                     owner_error=owner_error, pieces=pieces, keep_encoded=keep)
        got[keep] = run_workers(run, members)
    assert len(calls) == (0 if owner_error else members * pieces)  # one per owner and piece, kept only
    for plain, kept in zip(got[False], got[True]):
        assert plain.encoded is None and kept.encoded is not None
        assert kept.finite is plain.finite is True
        assert kept.codec_error == plain.codec_error and kept.codec_error > 0
        if owner_error:
            assert torch.equal(kept.owner_error[1], plain.owner_error[1])
        assert np.array_equal(_bits(kept.decoded_average()), _bits(plain.average))
        assert kept.encoded is None


def test_without_numba_nothing_is_kept(backend):
    """On the torch path the exchange ignores `keep_encoded` and writes the average."""
    backend("torch")
    groups = local_groups(1)
    x = torch.randn(1000)
    res = two_phase_average(x, get_codec("int8"), 0, 1, groups[0]._all_to_all, groups[0]._all_gather,
                            keep_encoded=True)
    assert res.encoded is None and res.finite is None
    assert torch.equal(res.average, get_codec("int8").decode(get_codec("int8").encode(x), 1000))


@needs_numba
def test_without_momentum_the_step_decodes_first_and_says_so(backend, caplog):
    backend("numba")
    codec = get_codec("int8", 32)
    x = torch.randn(100)
    encoded = EncodedAverage(codec, [(0, 100, 100, codec.encode(x))])
    param = torch.nn.Parameter(torch.zeros(100), requires_grad=False)
    opt = torch.optim.SGD([param], lr=LR, momentum=0.0)
    outer_sgd._said_decoded.clear()
    with caplog.at_level(logging.INFO):
        assert not outer_sgd.sgd_step_encoded(param, opt, encoded)
        assert not outer_sgd.sgd_step_encoded(param, opt, encoded)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "decoded into memory" in r.getMessage()]
    assert said == [(logging.INFO,  # a setting, not a fault: no warning
                     "outer step: the average is decoded into memory before the step (outer momentum is 0)")]
    assert torch.equal(param.detach(), torch.zeros(100))  # nothing done


@pytest.mark.parametrize("codec", ["int8", "fp4"])
def test_diloco_takes_the_fused_path_and_reaches_the_same_state(codec, backend, monkeypatch):
    """Two in-process workers, three outer steps: the outer step runs the decode-and-step kernel
    (counted) and θ, momentum and digests are the bits of the step on the decoded average."""
    if codec_kernels.numba is None:
        pytest.skip(NO_NUMBA)
    backend("numba")
    calls = []
    kernel = outer_sgd._DECODE_KERNEL

    def counted(*args):
        calls.append(len(args[6]))
        return kernel(*args)
    monkeypatch.setattr(outer_sgd, "_DECODE_KERNEL", counted)
    out = {}
    for fused in (True, False):
        calls.clear()
        groups = local_groups(2)
        for g in groups:
            g.encoded_average = fused
        out[fused] = (diloco_pair(codec, groups), sum(calls))
    numel = out[True][0][0][0].numel()
    # every element of θ, on both workers, at each of 3 steps (and outer_sgd.warm_up's 4 per worker)
    assert out[True][1] == 2 * (3 * numel + 4)
    assert out[False][1] == 2 * 4
    for (theta, mom, stats, live), (theta_d, mom_d, stats_d, _) in zip(out[True][0], out[False][0]):
        assert np.array_equal(_bits(theta), _bits(theta_d)) and np.array_equal(_bits(mom), _bits(mom_d))
        hashes = [s.global_hash for s in stats]
        assert hashes == [s.global_hash for s in stats_d] and len(hashes) == 3
        assert np.array_equal(_bits(live), _bits(theta))  # the live model ← θ in the same pass
