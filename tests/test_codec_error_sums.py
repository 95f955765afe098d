"""The owner's codec_error sums read off its encoded bytes (dilo/codec_error_sums.py).

Against a reference written here (torch's own decode of the format, sums in fp64 with
torch) to fp64 precision, and against the chunk-sized path it replaces (decode, then
`codec_kernels.sub_with_sumsq`) bit for bit, on edge values, partial blocks, slices that
start inside an encoding, and one and two threads.
"""

from __future__ import annotations

import pytest
import torch

from dilo import codec_error_sums, codec_kernels
from dilo.codecs import get_codec
from tests.helpers import numba_skip

NO_NUMBA, needs_numba = numba_skip("the kernel reading codec_error off the bytes does not exist without it")


def _mean(n: int, seed: int, case: str) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3
    if case == "zeros":
        x.zero_()
    elif case == "equal":  # all-equal blocks: every code the same
        x.fill_(0.25)
    elif case == "edges":  # subnormals, ties at the int8 step, huge values, zeros inside blocks
        x[::7] = 1e-41
        x[1::11] = 0.0
        x[2::13] = 3.0e38
        x[3::17] = -2.5 / 127
    return x


def _reference(codec, mean: torch.Tensor, codes: torch.Tensor, backend) -> tuple[float, float]:
    backend("torch")
    decoded = codec.decode(codes, mean.numel())
    backend("numba")
    return float((mean.double() ** 2).sum()), float(((mean - decoded).double() ** 2).sum())


@needs_numba
@pytest.mark.parametrize("name", ["int8", "fp4"])
@pytest.mark.parametrize("case", ["random", "zeros", "equal", "edges"])
@pytest.mark.parametrize("n", [1, 4095, 4096 * 3 + 67, (1 << 20) + 4099])
def test_sums_from_bytes_match_a_torch_reference_and_the_decoded_path(name, case, n, backend):
    backend("numba")
    codec = get_codec(name, 64)
    mean = _mean(n, n, case)
    codes = codec.encode(mean)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # (the kernel slices whole 4096-element blocks over torch's threads)
            torch.set_num_threads(threads)
            got = codec_error_sums.from_bytes(codec, codes, n, mean)
            decoded = codec.decode(codes, n)
            want = codec_kernels.sub_with_sumsq(mean, decoded, torch.empty(n))
            assert got == want  # the same bits as the chunk-sized path
            ref = _reference(codec, mean, codes, backend)
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-300)
    finally:
        torch.set_num_threads(before)


@needs_numba
def test_other_codecs_or_layouts_are_declined(backend):
    backend("numba")
    mean = torch.randn(100)
    assert codec_error_sums.from_bytes(get_codec("bf16"), get_codec("bf16").encode(mean), 100, mean) is None
    int8 = get_codec("int8", 32)
    codes = int8.encode(mean)
    assert codec_error_sums.from_bytes(int8, codes, 100, mean) is not None
    assert codec_error_sums.from_bytes(int8, codes, 100, torch.randn(200)[::2]) is None  # not contiguous
    assert codec_error_sums.from_bytes(int8, codes, 100, mean.double()) is None
    assert codec_error_sums.from_bytes(int8, codes, 99, mean) is None
    backend("torch")
    assert codec_error_sums.from_bytes(int8, codes, 100, mean) is None
