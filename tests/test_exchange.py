"""The two-phase exchange: identical bytes everywhere, bounded error, exact byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from tests.helpers import run_workers

LOSSY = ["bf16", "fp16", "int8", "fp4"]


def exchange(vectors: list[torch.Tensor], codec_name: str, block_size: int = 64):
    codec = get_codec(codec_name, block_size)
    groups = local_groups(len(vectors))
    return run_workers(lambda r: groups[r].average(vectors[r].clone(), codec), len(vectors))


def vectors(num: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * (i + 1) for i in range(num)]


@pytest.mark.parametrize("codec", ["fp32", *LOSSY])
@pytest.mark.parametrize("num", [2, 3])
def test_every_member_gets_identical_bytes(codec, num):
    results = exchange(vectors(num, 1000), codec)
    for res in results[1:]:
        assert torch.equal(res.average, results[0].average)
    assert results[0].num_peers == num


def test_fp32_is_the_exact_mean():
    vs = vectors(3, 1001)
    avg = exchange(vs, "fp32")[0].average
    torch.testing.assert_close(avg, torch.stack(vs).mean(0), atol=1e-6, rtol=0)


def monotone_bound(codec, x: torch.Tensor) -> torch.Tensor:
    """A per-element error bound that only grows with |x| and with its block's absmax.

    fp4's exact bound (half the gap to the nearest representable magnitudes) is not
    monotone; between m and 2m the error is at most |x|/3, below s/64 at most s/128.
    """
    if codec.name != "fp4":
        return codec.error_bound(x)
    n, b = x.numel(), codec.block_size
    padded = torch.zeros(-(-n // b) * b)
    padded[:n] = x.abs()
    absmax = padded.view(-1, b).amax(1).repeat_interleave(b)[:n]
    return torch.maximum(x.abs() / 3, absmax / 128) * (1 + 1e-6)


@pytest.mark.parametrize("codec", LOSSY)
def test_error_within_codec_bound(codec):
    """|avg − mean| ≤ (phase-1 bound, averaged) + (phase-2 bound of a value up to that far away)."""
    vs = vectors(3, 1000)
    c = get_codec(codec, 64)
    mean = torch.stack(vs).mean(0)
    phase1 = torch.stack([monotone_bound(c, v) for v in vs]).mean(0)
    phase2 = monotone_bound(c, mean.abs() + phase1)
    err = (exchange(vs, codec)[0].average - mean).abs()
    assert (err <= phase1 + phase2 + 1e-7).all()
    assert err.max() > 0  # lossy codecs do lose something: the test is not vacuous


@pytest.mark.parametrize("codec", ["fp32", *LOSSY])
@pytest.mark.parametrize("num,numel", [(2, 1000), (3, 1000), (4, 77)])
def test_byte_counts_equal_theory(codec, num, numel):
    block = 1 if codec in ("fp32", "bf16", "fp16") else 64
    chunk = math.ceil(math.ceil(numel / num) / block) * block  # equal chunks of whole blocks
    per_chunk = {
        "fp32": 4 * chunk, "bf16": 2 * chunk, "fp16": 2 * chunk,
        "int8": chunk + 4 * (chunk // 64), "fp4": chunk // 2 + 4 * (chunk // 64),
    }[codec]
    theory = 2 * (num - 1) * per_chunk  # reduce-scatter + all-gather, own slice stays home
    for res in exchange(vectors(num, numel), codec):
        assert res.bytes_sent == theory
        assert res.bytes_received == theory


def test_non_finite_contribution_is_dropped_and_counted():
    vs = vectors(3, 600)
    vs[2][10] = float("nan")  # lands in member 0's chunk
    results = exchange(vs, "fp32")
    assert results[0].dropped == 1 and results[1].dropped == 0
    avg = results[0].average
    assert torch.isfinite(avg).all()
    torch.testing.assert_close(avg[:200], (vs[0][:200] + vs[1][:200]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(avg[200:], torch.stack(vs).mean(0)[200:], atol=1e-6, rtol=0)
