"""fp4 (E3M0) against its specification, and error feedback for lossy codecs."""

from __future__ import annotations

import math

import pytest
import torch

from dilo.codecs import get_codec
from dilo.comm.protocol import chunk_numel
from dilo.fragments import Fragment, codec_roundtrip


def test_fp4_size_is_half_a_byte_per_value_plus_one_fp32_scale_per_block():
    codec = get_codec("fp4", 64)
    for n in (1, 63, 64, 1000, 1001):
        x = torch.randn(n)
        buf = codec.encode(x)
        assert buf.dtype == torch.uint8 and buf.numel() == math.ceil(n / 2) + 4 * math.ceil(n / 64)


def test_fp4_is_exact_on_representable_values():
    """E3M0: sign and a 3-bit exponent, magnitudes {0} ∪ {s·2^-k, k = 0..6}, s = block absmax."""
    codec = get_codec("fp4", 16)
    scale = 3.0
    mags = [0.0] + [scale * 2.0**-k for k in range(7)]
    x = torch.tensor([*mags, *[-m for m in mags[1:]], scale])  # 16 values, absmax = scale
    assert torch.equal(codec.decode(codec.encode(x), x.numel()), x)


def test_fp4_error_within_bound_otherwise():
    codec = get_codec("fp4", 32)
    x = torch.randn(4096) * torch.logspace(-3, 2, 4096)
    err = (codec_roundtrip(codec, x) - x).abs()
    assert (err <= codec.error_bound(x) + 1e-12).all()
    # the bound itself: at most half the gap to the next magnitude, at most s/128 near zero
    absmax = x.abs().view(-1, 32).amax(1).repeat_interleave(32)
    assert (err <= torch.maximum(x.abs() / 3, absmax / 128) * (1 + 1e-6)).all()
    assert err.max() > 0


@pytest.mark.parametrize("size,numel", [(2, 1000), (3, 1001), (4, 77)])
@pytest.mark.parametrize("name", ["int8", "fp4"])
def test_roundtrip_equals_what_phase_one_delivers(name, size, numel):
    """Error feedback computes the loss of the whole vector; the exchange encodes owner chunks.
    They agree because chunks are whole codec blocks (checked here bit for bit)."""
    codec = get_codec(name, 64)
    x = torch.randn(numel) * torch.linspace(0.01, 10, numel)
    chunk = chunk_numel(numel, size, codec.block_size)
    padded = torch.zeros(chunk * size)
    padded[:numel] = x
    per_chunk = torch.cat([codec.decode(codec.encode(c), chunk) for c in padded.view(size, chunk)])
    assert torch.equal(per_chunk[:numel], codec_roundtrip(codec, x))


@pytest.mark.parametrize("name", ["fp4", "int8", "bf16"])
def test_error_feedback_makes_the_sum_of_what_was_sent_converge(name):
    """Σ decode(sent_t) = Σ Δ_t − e_T: the gap is one round's error, not a sum of them."""
    codec = get_codec(name, 64)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(512, generator=g) * 0.01  # a small persistent signal the codec rounds away
    frag = Fragment(0, [torch.nn.Parameter(torch.zeros(512))], 0.7, 0.9, True, eager=False,
                    error_feedback=True)
    true_sum, wire_with, wire_without = torch.zeros(512), torch.zeros(512), torch.zeros(512)
    gaps = []
    for t in range(1, 81):
        delta = bias + torch.randn(512, generator=g) * torch.logspace(-2, 1, 512)
        true_sum += delta
        sent = frag.compensate(delta, codec)
        wire_with += codec_roundtrip(codec, sent)
        wire_without += codec_roundtrip(codec, delta)
        assert torch.allclose(wire_with + frag.residual, true_sum, atol=1e-3)
        gaps.append((wire_with - true_sum).norm() / true_sum.norm())
    with_ef = (wire_with - true_sum).norm()
    without = (wire_without - true_sum).norm()
    assert with_ef <= frag.residual.norm() * 1.001 + 1e-3
    assert with_ef < 0.2 * without  # what is lost without feedback accumulates
    assert gaps[-1] < gaps[9]  # the relative gap shrinks as rounds add up: it converges
