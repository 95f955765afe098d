"""The owner's one-pass kernels (dilo/reduce_kernels.py) give exactly the torch path's bits.

The torch path is decode (torch backend), ``isfinite(part).all()``, ``part.abs().max()`` and
a zeroed fp32 sum with ``+=`` in member order; every kernel is compared with it bit for bit
on edge values and on hand-made bytes (inf/NaN scales, a scale whose 128× overflows, code
-128) that no honest encoder writes.
"""

import math

import numpy as np
import pytest
import torch

from dilo import codec_kernels, reduce_kernels
from dilo.aggregate import MEAN, codec_limit, why_unsendable
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from tests.helpers import run_workers

pytestmark = pytest.mark.skipif(codec_kernels.numba is None, reason="numba not installed, so there are no kernels to compare with the torch path; `pip install -e .[test]` (or `pip install numba`) runs these tests")


def _f32(values) -> torch.Tensor:
    return torch.tensor(np.array(values, dtype=np.float32))


def _cases() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    cases = {
        "zeros": torch.zeros(300),
        "negative_zeros": -torch.zeros(9),
        "all_equal": torch.full((300,), 0.3),
        "all_equal_negative": torch.full((257,), -2.5),
        "ties": _f32([127] + [k + 0.5 for k in range(-127, 127)]),
        "subnormals": _f32([1e-45, -3e-45, 1e-40, -2e-39, 1.1e-38, 0.0, 5e-42]),
        "subnormal_with_normal": _f32([1e-40, 1.0, -1e-44, 1e-38]),
        "huge": _f32([3.4e38, -3.4e38, 1e38, 1.0, -1e-30]),
        "inf": _f32([1.0, np.inf, -2.0, 0.0, 5.0]),
        "neg_inf": _f32([1.0, -np.inf, -2.0, 0.0, 5.0]),
        "nan": _f32([1.0, np.nan, -2.0, 0.0, 5.0]),
        "one": _f32([-0.7]),
    }
    for n in (2, 257, 4097):
        cases[f"random_{n}"] = torch.tensor((rng.standard_normal(n) * rng.random(n) ** 6 * 10).astype(np.float32))
    return cases


CASES = _cases()


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).copy()


def _tampered(codec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The honest bytes of x, and the same with one scale replaced (and int8 code -128)."""
    buf = codec.encode(x)
    n = x.numel()
    first_scale = n if codec.name == "int8" else (n + 1) // 2
    out = {"honest": buf}
    for label, value in (("inf_scale", np.inf), ("nan_scale", np.nan), ("big_scale", 3.0e38),
                         ("edge_scale", 3.4e38 / 127.5)):
        b = buf.clone()
        b[first_scale:first_scale + 4] = torch.tensor(np.array([value], np.float32).view(np.uint8))
        out[label] = b
        if codec.name == "int8":
            c = b.clone()
            c[0] = 0x80  # -128
            out[label + "_q-128"] = c
    return out


def _torch_decode(codec, buf: torch.Tensor, n: int) -> torch.Tensor:
    before = codec_kernels.BACKEND
    codec_kernels.use_backend("torch")
    try:
        return codec.decode(buf, n)
    finally:
        codec_kernels.BACKEND = before


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size", [1, 7, 256])
@pytest.mark.parametrize("name", ["int8", "fp4"])
def test_fused_screen_and_add_match_decode_then_add(name, block_size, case):
    codec = get_codec(name, block_size)
    screen, add = reduce_kernels.fused_contribution(codec)
    x = CASES[case]
    n = x.numel()
    previous = torch.tensor(np.random.default_rng(n).standard_normal(n).astype(np.float32))
    for label, buf in _tampered(codec, x).items():
        part = _torch_decode(codec, buf, n)
        finite = bool(torch.isfinite(part).all())
        assert screen(buf, n) == finite, (label, part)
        if not finite:
            continue
        first = torch.full((n,), 7.0)
        add(buf, first, True)
        expected = torch.zeros(n)
        expected += part
        np.testing.assert_array_equal(_bits(first), _bits(expected), err_msg=label)
        summed = previous.clone()
        add(buf, summed, False)
        expected = previous.clone()
        expected += part
        np.testing.assert_array_equal(_bits(summed), _bits(expected), err_msg=label)
        for divisor in (1, 2, 3, 7):  # a mean's last add: the sum, then torch's div_ (one pass)
            for first in (True, False):
                got = previous.clone()
                add(buf, got, first, divisor)
                expected = torch.zeros(n) if first else previous.clone()
                expected += part
                expected.div_(divisor)
                np.testing.assert_array_equal(_bits(got), _bits(expected), err_msg=f"{label} ÷{divisor} {first}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_max_abs_and_add_into(case):
    x = CASES[case]
    want = float(x.abs().max())
    got = reduce_kernels.max_abs(x)
    assert (math.isnan(got) and math.isnan(want)) or got == want
    if not torch.isfinite(x).all():
        return
    total = torch.full_like(x, 3.0)
    reduce_kernels.add_into(total, x, True)  # 0 + x: -0 becomes +0, as a zeroed sum gives
    expected = torch.zeros_like(x)
    expected += x
    np.testing.assert_array_equal(_bits(total), _bits(expected))
    reduce_kernels.add_into(total, x, False)
    expected += x
    np.testing.assert_array_equal(_bits(total), _bits(expected))


def test_max_abs_of_nan_with_inf_and_empty():
    assert math.isnan(reduce_kernels.max_abs(_f32([np.inf, np.nan, 1.0])))
    assert reduce_kernels.max_abs(_f32([-np.inf, 1.0])) == math.inf
    assert reduce_kernels.max_abs(torch.zeros(0)) == 0.0


def test_why_unsendable_one_pass_matches_its_reasons():
    bf16 = get_codec("bf16")
    assert why_unsendable(_f32([1.0, np.nan]), bf16) == "not finite"
    assert why_unsendable(_f32([1.0, -np.inf]), get_codec("int8")) == "not finite"
    assert why_unsendable(_f32([1.0, -3.4e38]), bf16).startswith("out of the bf16 codec's finite range")
    assert why_unsendable(_f32([1.0, -6e4]), get_codec("fp16")) is None
    assert why_unsendable(_f32([1.0, -65504]), get_codec("fp16")).startswith("out of the fp16")
    assert why_unsendable(torch.zeros(0), bf16) is None


@pytest.mark.parametrize("name", ["int8", "fp4", "bf16", "fp32"])
def test_reduce_fused_and_reused_sum_match_the_torch_path(name):
    """MEAN.reduce over 4 members (one non-finite) with the kernels and a reused sum buffer
    against the torch path with fresh tensors: the same result bits, the same screening."""
    codec = get_codec(name, 64)
    n = 1000
    rng = np.random.default_rng(3)
    parts = [torch.tensor(rng.standard_normal(n).astype(np.float32)) for _ in range(4)]
    parts[0][::7] = -0.0
    parts[2][5] = np.inf
    bufs = [codec.encode(p) for p in parts]
    limit = codec_limit(codec)  # bf16 clamps the inf to its limit: saturated
    expected, screened = MEAN.reduce(lambda m: _torch_decode(codec, bufs[m], n), 4, n, limit)
    kernels = reduce_kernels.fused_contribution(codec)
    fused = None if kernels is None else (*kernels, lambda m: bufs[m])
    total = torch.full((n,), 5.0)
    got, screened2 = MEAN.reduce(lambda m: codec.decode(bufs[m], n), 4, n, limit, total=total,
                                   fused=fused)
    assert got.data_ptr() == total.data_ptr()
    assert screened.accepted == screened2.accepted == [0, 1, 3]
    assert screened.rejected == screened2.rejected
    assert [m for m, _ in screened.rejected] == [2]
    np.testing.assert_array_equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("name", ["int8", "fp4", "bf16"])
@pytest.mark.parametrize("bad", ["none", "one_member", "every_member_of_a_chunk"])
def test_exchange_reports_the_averages_finiteness_from_its_bytes(name, bad):
    """`ExchangeResult.finite` (int8/fp4: read off the gathered scales) agrees with a pass over
    the average, with a padded last chunk and with a chunk no member sent finite values for."""
    size, numel = 3, 1000  # chunks of 384 with blocks of 64: the last one is padded
    codec = get_codec(name, 64)
    rng = np.random.default_rng(5)
    vectors = [torch.tensor(rng.standard_normal(numel).astype(np.float32)) for _ in range(size)]
    if bad == "one_member":
        vectors[1][500] = np.nan
    elif bad == "every_member_of_a_chunk":
        for v in vectors:
            v[900] = np.inf
    groups = local_groups(size)
    results = run_workers(lambda r: groups[r].average(vectors[r], codec), size)
    for res in results:
        expected = bool(torch.isfinite(res.average).all())
        assert res.finite in ((None,) if name == "bf16" else (expected,))
    assert bool(torch.isfinite(results[0].average).all()) == (bad != "every_member_of_a_chunk")
