"""Codecs: sizes, error bounds, exact values, byte layout, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from dilo.codecs import CODEC_NAMES, get_codec

LOSSY = [n for n in CODEC_NAMES if n != "fp32"]
SIZES = [1, 2, 255, 256, 257, 1000, 4096 + 3]


def sample(n: int, seed: int = 0) -> torch.Tensor:
    """Normal data with a few outliers, as pseudo-gradients tend to have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::97] *= 1000.0
    x[5::331] = 0.0
    return x


def expected_nbytes(name: str, n: int, b: int) -> int:
    blocks = math.ceil(n / b)
    if name == "sparse":  # k = 82 of 4096 kept: a bitmap of k + 128 bits, 5 low + 2 value bits each; 2 fp32
        blocks, bits = math.ceil(n / 4096), 0
        for r in [4096] * (n // 4096) + ([n % 4096] if n % 4096 else []):
            kept = min(82, r)
            bits += math.ceil((kept + (r - 1) // 32 + 1 + kept * 7) / 8) * 8
        return bits // 8 + 8 * blocks
    return {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "int8": n + 4 * blocks,
            "fp4": math.ceil(n / 2) + 4 * blocks, "int2": math.ceil(n / 4) + 4 * blocks}[name]


@pytest.mark.parametrize("block_size", [256, 7])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_size_dtype_and_error_bound(name, n, block_size):
    codec = get_codec(name, block_size)
    x = sample(n)
    buf = codec.encode(x)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == codec.encoded_nbytes(n) == expected_nbytes(name, n, codec.block_size)
    y = codec.decode(buf, n)
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = (y - x).abs()
    bound = codec.error_bound(x)
    assert bound.shape == x.shape and bound.dtype == torch.float32
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"
    if codec.lossless:
        assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_only_fp32_is_lossless_and_block_sizes():
    assert [n for n in CODEC_NAMES if get_codec(n).lossless] == ["fp32"]
    assert [get_codec(n, 64).block_size for n in CODEC_NAMES] == [1, 1, 1, 64, 64, 64, 4096]


@pytest.mark.parametrize("name", LOSSY)
def test_bound_holds_on_awkward_values(name):
    # Tiny, subnormal, huge and tie-like values, mixed within blocks.
    x = torch.tensor([1e-30, -1e-40, 3e-45, 65504.0, 65519.0, -7e37, 1.5, 0.75,
                      2.0**-7, 3 * 2.0**-9, 1.0 + 2.0**-9, -1.0 - 2.0**-12] * 30)
    codec = get_codec(name, block_size=16)
    err = (codec.decode(codec.encode(x), x.numel()) - x).abs()
    assert torch.all(err <= codec.error_bound(x))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_zero_blocks_decode_to_exact_zeros(name):
    codec = get_codec(name, block_size=8)
    x = torch.zeros(8 * 3 + 5)
    x[8:16] = torch.linspace(-1, 1, 8)  # one nonzero block between zero blocks
    y = codec.decode(codec.encode(x), x.numel())
    assert not torch.isnan(y).any()
    assert torch.all(y[:8] == 0) and torch.all(y[16:] == 0)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_deterministic(name):
    codec = get_codec(name)
    x = sample(5000, seed=3)
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))


def test_fp16_clamps_instead_of_inf():
    codec = get_codec("fp16")
    y = codec.decode(codec.encode(torch.tensor([1e6, -1e6, 7e4])), 3)
    assert torch.isfinite(y).all()
    assert y.tolist() == [65504.0, -65504.0, 65504.0]
    bf = get_codec("bf16")
    assert torch.isfinite(bf.decode(bf.encode(torch.tensor([3.4e38, -3.4e38])), 2)).all()


def test_fp4_representable_values_are_exact():
    s = 3.0  # block absmax
    mags = [s * 2.0**-k for k in range(7)]
    x = torch.tensor([0.0] + mags + [-m for m in mags] + [0.0])  # 16 values, absmax s
    codec = get_codec("fp4", block_size=16)
    y = codec.decode(codec.encode(x), x.numel())
    assert torch.equal(y, x)
    assert torch.all(codec.error_bound(x) == 0)


def test_fp4_byte_layout():
    # Block of 4 with absmax 2: 2 -> code 7, -1 -> sign|code 6 = 0b1110, 0 -> 0,
    # 0.5 -> code 5. Element 0 is the low nibble of byte 0.
    codec = get_codec("fp4", block_size=4)
    buf = codec.encode(torch.tensor([2.0, -1.0, 0.0, 0.5]))
    assert buf[:2].tolist() == [0xE7, 0x50]  # (0xE << 4) | 0x7, (0x5 << 4) | 0x0
    assert buf[2:].clone().view(torch.float32).tolist() == [2.0]
    # Odd count: the last high nibble is zero padding.
    assert codec.encode(torch.tensor([-2.0]))[:1].tolist() == [0xF]


def test_fp4_rounding_ties_to_larger_magnitude():
    codec = get_codec("fp4", block_size=8)
    # absmax 1: 0.75 is midway between 0.5 and 1; 2**-7 midway between 0 and 2**-6.
    x = torch.tensor([1.0, 0.75, -0.75, 2.0**-7, 0.74, 2.0**-7 * 0.99, 0.3, 0.0])
    y = codec.decode(codec.encode(x), x.numel())
    assert y.tolist() == [1.0, 1.0, -1.0, 2.0**-6, 0.5, 0.0, 0.25, 0.0]


def test_fp4_matches_brute_force_nearest():
    # Independent reference in float64: nearest of the 8 magnitudes, ties to the larger.
    b = 64
    x = sample(64 * 40, seed=5)
    # Block 0 has absmax 1 and holds every exact midpoint: 0.75 * 2**-k and 2**-7.
    x[:64] = torch.tensor(([1.0] + [0.75 * 2.0**-k for k in range(6)] + [2.0**-7]) * 8)
    # Blocks whose midpoints 1.5 * s * 2**-k need 25 bits: the fp32 neighbours of each
    # midpoint must still round to the nearer magnitude.
    for i, s in enumerate([1 + 2.0**-23, -(1 + 3 * 2.0**-23), 2 - 2.0**-23], start=1):
        mids = torch.tensor([0.75 * abs(s) * 2.0**-k for k in range(6)] + [abs(s) * 2.0**-7],
                            dtype=torch.float64)
        near = torch.cat([mids.float(), torch.nextafter(mids.float(), torch.tensor(0.0)),
                          torch.nextafter(mids.float(), torch.tensor(1.0))])
        x[64 * i : 64 * (i + 1)] = torch.cat([torch.tensor([s]), near, -near, near])[:64]
    codec = get_codec("fp4", block_size=b)
    y = codec.decode(codec.encode(x), x.numel()).double()
    xb = x.double().view(-1, b)
    s = xb.abs().amax(dim=1, keepdim=True)
    mags = torch.cat([torch.zeros_like(s)] + [s * 2.0**-k for k in range(6, -1, -1)], dim=1)
    dist = (xb.abs().unsqueeze(-1) - mags.unsqueeze(1)).abs()  # (blocks, b, 8)
    # argmin returns the first minimum; search from the largest magnitude down.
    nearest = mags.gather(1, 7 - dist.flip(-1).argmin(-1)) * xb.sign()
    assert torch.equal(y, nearest.view(-1))
    # The bound is that distance exactly, and within the coarse bucket bound.
    bound = codec.error_bound(x).double().view(-1, b)
    assert torch.equal(bound, dist.min(-1).values)
    a = xb.abs()
    m = torch.where(a >= s / 64, s * 2.0 ** torch.floor(torch.log2(a / s)), s / 64)
    assert torch.all(bound <= m / 2)


def test_int8_layout_and_values():
    codec = get_codec("int8", block_size=4)
    x = torch.tensor([1.0, -0.5, 0.0, 0.25, 4.0])
    buf = codec.encode(x)
    assert buf[:5].view(torch.int8).tolist() == [127, -64, 0, 32, 127]  # round half even
    assert torch.equal(buf[5:].clone().view(torch.float32), torch.tensor([1.0, 4.0]) / 127)


def test_int8_beats_fp4():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    errs = {}
    for name in ("int8", "fp4"):
        codec = get_codec(name)
        errs[name] = (codec.decode(codec.encode(x), x.numel()) - x).abs().mean().item()
    assert 0 < errs["int8"] < errs["fp4"]


@pytest.mark.parametrize("name", ["int8", "fp4", "int2"])
def test_nonfinite_input_does_not_crash(name):
    codec = get_codec(name, block_size=4)
    x = torch.tensor([1.0, float("inf"), 2.0, 3.0, float("nan"), 1.0, 0.0, 0.0, 1.0, 2.0])
    y = codec.decode(codec.encode(x), x.numel())
    assert not torch.isfinite(y[:8]).any()  # both poisoned blocks are non-finite
    assert torch.isfinite(y[8:]).all()


def test_get_codec_errors():
    with pytest.raises(ValueError) as info:
        get_codec("nope")
    for name in CODEC_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        get_codec("int8", block_size=0)
    with pytest.raises(ValueError):
        get_codec("fp4", block_size=-1)


def test_decode_rejects_wrong_size():
    codec = get_codec("int8")
    buf = codec.encode(torch.ones(300))
    with pytest.raises(ValueError):
        codec.decode(buf[:-1], 300)


def test_decode_unaligned_slice():
    # A chunk cut out of a larger receive buffer at an odd offset still decodes.
    codec = get_codec("fp4", block_size=8)
    x = sample(21)
    buf = codec.encode(x)
    big = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])
    assert torch.equal(codec.decode(big[1:], 21), codec.decode(buf, 21))


def test_large_input_spans_chunks():
    # More than one internal chunk, with a short final block.
    n = (1 << 20) + 3 * 256 + 11
    x = sample(n, seed=7)
    for name in ("int8", "fp4", "int2", "sparse"):
        codec = get_codec(name)
        err = (codec.decode(codec.encode(x), n) - x).abs()
        assert torch.all(err <= codec.error_bound(x))
