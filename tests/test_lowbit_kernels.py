"""The int2 and sparse numba kernels (dilo/int2_kernels.py) give exactly the torch path's bytes.

Each case encodes with both paths and compares the bytes, then decodes both paths' bytes
with both paths and compares the bit patterns (NaN payloads included). The inputs are
the edge cases of the formats: zeros and -0.0, exact ties, subnormals, ±inf, NaN of
either sign and another payload, all-equal blocks, a short last block, magnitudes that
fall steeply from block to block, and the density edge cases of sparse (one kept entry,
every entry kept, a last block shorter than k).
tests/test_codec_lowbit.py checks the default path (these kernels, when numba is
installed) against a plain-Python reference of the formats.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dilo import codec_kernels, int2_kernels
from dilo.codecs import get_codec

pytestmark = pytest.mark.skipif(
    codec_kernels.numba is None,
    reason="numba not installed, so there are no kernels to compare with the torch path; "
           "`pip install -e .[test]` (or `pip install numba`) runs these tests")

NEG_NAN = np.array([0xFFC00000], np.uint32).view(np.float32)[0]
ODD_NAN = np.array([0x7FC01234], np.uint32).view(np.float32)[0]
CASES = ["random", "zeros", "ties", "equal", "subnormal", "inf", "nan", "huge", "falling"]


def make(case: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]
    if case == "zeros":
        x[:] = 0.0
        x[1::3] = -0.0
    elif case == "ties":
        x[::5], x[1::5], x[2::7] = 0.5, -0.5, 0.25
    elif case == "equal":
        x[:] = -0.75
    elif case == "subnormal":
        x *= 1e-40
        x[::9] = 1.4e-45
    elif case == "inf":
        x[3::17], x[5::23] = float("inf"), float("-inf")
        x[9::31] = torch.finfo(torch.float32).max  # ties with inf in sparse's key
    elif case == "nan":
        x[::13] = float("nan")
        x[4::29] = float(NEG_NAN)
        x.view(torch.int32)[7::37] = int(np.array([ODD_NAN]).view(np.int32)[0])
        x[5::41] = float("inf")
    elif case == "huge":
        x *= 1e36
    elif case == "falling":  # each block far below the last: sparse lowers its first bound
        x = torch.randn(n, generator=g) * torch.logspace(20, -30, n)
    return x


def both_paths(codec, x: torch.Tensor) -> None:
    """Bytes and decoded bits agree between the kernel and the torch path."""
    before = codec_kernels.BACKEND
    try:
        enc, dec = {}, {}
        for path in ("torch", "numba"):
            codec_kernels.use_backend(path)
            enc[path] = codec.encode(x)
        assert torch.equal(enc["numba"], enc["torch"]), "encoded bytes differ"
        for path in ("torch", "numba"):
            codec_kernels.use_backend(path)
            dec[path] = codec.decode(enc["torch"], x.numel()).view(torch.int32)
        assert torch.equal(dec["numba"], dec["torch"]), "decoded values differ"
    finally:
        codec_kernels.BACKEND = before


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,b", [(1, 8), (7, 3), (1000, 7), (4096 + 50, 256), (3000, 64), (5000, 1000),
                                 (256 * 7, 256), (16 * 33 + 4, 16), (200 * 6 + 1, 200), (1024 * 3, 1024)])
def test_int2_kernel_is_the_torch_path(case, n, b):
    """(b = 16, 64, 256: the usual case's kernel for the whole blocks, then the general one.)"""
    both_paths(get_codec("int2", b), make(case, n, seed=n + b))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,b,density,vb", [
    (4096 * 3 + 100, 4096, 0.02, 2),  # a short last block with more than k elements
    (1000, 64, 0.1, 4),
    (700, 256, 0.02, 8),  # k = 5; the last block (188) has more than k
    (70, 64, 0.5, 2),  # last block of 6 < k = 32: padding kept, m = 0
    (300, 16, 1.0, 4),  # every entry kept
    (500, 128, 0.001, 2),  # k = 1
    (1000, 100, 0.05, 2),  # blocks that are not whole words of 8 flags
    (333, 13, 0.3, 4),
])
def test_sparse_kernel_is_the_torch_path(case, n, b, density, vb):
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)
    both_paths(codec, make(case, n, seed=n + b))


def test_sparse_kernel_decode_range_is_the_torch_path():
    codec = get_codec("sparse", density=0.05, value_bits=4, sparse_block=128)
    n = 128 * 9 + 30
    buf = codec.encode(make("random", n, seed=3))
    before = codec_kernels.BACKEND
    try:
        for lo, hi in [(0, n), (128, 300), (256, 256), (1024, n), (1152, n - 1)]:
            got = {}
            for path in ("torch", "numba"):
                codec_kernels.use_backend(path)
                got[path] = codec.decode_range(buf, n, lo, hi).view(torch.int32)
            assert torch.equal(got["numba"], got["torch"]), (lo, hi)
    finally:
        codec_kernels.BACKEND = before


def test_sparse_kernel_refuses_a_malformed_payload():
    codec = get_codec("sparse", density=0.05, value_bits=2, sparse_block=128)
    buf = codec.encode(make("random", 256, seed=4))
    extra = buf.clone()
    extra[0] ^= 0xFF  # the first block's unary bitmap: a wrong number of offsets
    with pytest.raises(ValueError, match="malformed"):
        codec.decode(extra, 256)


def test_int2_usual_case_takes_the_vector_kernel():
    """The default block size on this torch runs _int2_encode16 (its sums in <4 x double>)."""
    b = get_codec("int2").block_size
    assert int2_kernels._fast(b, int2_kernels._torch_lanes(b))
    x = make("random", 4 * b, seed=8).numpy()
    sums = np.empty(4, np.float64)
    int2_kernels._int2_scales(x, sums, np.empty(4, np.float32), b, 4)
    scales, out = np.empty(4, np.float32), np.empty(b, np.uint8)
    assert int2_kernels._int2_encode16(x, scales, out, b) == 0
    assert np.array_equal(scales, np.sqrt(sums / b).astype(np.float32))


@pytest.mark.parametrize("b", [3, 8, 16, 64, 200, 256, 1000, 4096])
def test_int2_scales_add_in_torchs_order(b):
    """The kernel's fp64 sums of squares are torch's bit for bit (the order it reproduces)."""
    int2_kernels._lanes.pop(b, None)
    assert int2_kernels._torch_lanes(b) > 0
    x = make("random", 5 * b + b // 3, seed=b)
    want = torch.nn.functional.pad(x, (0, -x.numel() % b)).view(-1, b).double().square_().sum(dim=1)
    got = np.empty(want.numel(), np.float64)
    int2_kernels._int2_scales(x.numpy(), got, np.empty(want.numel(), np.float32), b,
                                int2_kernels._torch_lanes(b))
    assert np.array_equal(got.view(np.int64), want.numpy().view(np.int64))


def test_int2_without_torchs_order_takes_torchs_scales(monkeypatch):
    """A torch whose sum order the kernel does not reproduce: scales from torch, same bytes."""
    monkeypatch.setitem(int2_kernels._lanes, 256, 0)
    both_paths(get_codec("int2", 256), make("random", 256 * 5 + 9, seed=5))
    both_paths(get_codec("int2", 256), make("nan", 256 * 5 + 9, seed=6))


@pytest.mark.parametrize("name", ["int2", "sparse"])
def test_torch_path_is_announced_once(monkeypatch, caplog, name):
    monkeypatch.setattr(codec_kernels, "numba", None)
    monkeypatch.setattr(codec_kernels, "_warned", False)
    monkeypatch.setattr(codec_kernels, "BACKEND", "torch")
    codec, x = get_codec(name), make("random", 5000, seed=7)
    with caplog.at_level(logging.WARNING, logger="dilo.codec_kernels"):
        for _ in range(2):
            codec.decode(codec.encode(x), x.numel())
    msgs = [r.getMessage() for r in caplog.records if "codec kernels" in r.getMessage()]
    assert len(msgs) == 1 and "numba not installed" in msgs[0]


AVX2 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sse,"
        "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


@pytest.mark.slow
@pytest.mark.parametrize("cpu,features", [("haswell", AVX2), ("generic", "")])
def test_kernels_compiled_without_avx512_are_the_torch_path(tmp_path, cpu, features):
    """The vector intrinsics (int2's <4 x double> sums, sparse's vector compress and
    popcounts) compiled for a CPU without AVX512 (LLVM's generic expansions, sparse's
    skip of empty steps) give the same bytes: this file's comparisons in a child process
    whose numba targets that CPU, with its own cache."""
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow",
         "-k", "kernel_is_the_torch_path or usual_case or torchs_order"],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
        check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
