"""The int8/fp4 kernels give exactly the bytes of a plain reference encoder, on both paths.

The reference below is written from the format in dilo/codecs.py's docstring with
numpy and python only (exact float64 comparisons for fp4, not the fp32 thresholds the
codecs use), so it shares no code with either implementation. Every case runs on the
torch path and, when numba is installed, on the numba kernels.
"""

import logging

import numpy as np
import pytest
import torch

from dilo import codec_kernels
from dilo.codecs import get_codec

BACKENDS = [
    "torch",
    pytest.param(
        "numba",
        marks=pytest.mark.skipif(
            codec_kernels.numba is None, reason="numba not installed: only the torch path is tested"
        ),
    ),
]
NAN_BITS = 0x7FC00000  # the canonical quiet NaN torch.amax returns for any NaN


@pytest.fixture(params=BACKENDS)
def backend(request):
    before = codec_kernels.BACKEND
    codec_kernels.use_backend(request.param)
    try:
        yield request.param
    finally:
        codec_kernels.BACKEND = before


def _block_absmax(blk: np.ndarray) -> np.float32:
    if np.isnan(blk).any():
        return np.array([NAN_BITS], np.uint32).view(np.float32)[0]
    return np.abs(blk).max()


def ref_int8(x: np.ndarray, b: int) -> bytes:
    q, scales = [], []
    with np.errstate(all="ignore"):
        for start in range(0, x.size, b):
            blk = x[start : start + b]
            s = _block_absmax(blk) / np.float32(127)  # fp32 division
            w = blk / (s if s > 0 else np.float32(1))
            w = np.clip(np.where(np.isnan(w), np.float32(0), w), -127, 127)
            q.append(np.rint(w).astype(np.int8))  # rint: half to even
            scales.append(s)
    return np.concatenate(q + [np.zeros(0, np.int8)]).tobytes() + np.array(scales, np.float32).tobytes()


def ref_fp4(x: np.ndarray, b: int) -> bytes:
    # Boundaries between magnitudes {0, s/64, ..., s/2, s}, exact in float64; ties go up.
    mids = [2.0**-7] + [1.5 * 2.0 ** (c - 8) for c in range(2, 8)]
    nibbles, scales = [], []
    for start in range(0, x.size, b):
        blk = x[start : start + b]
        s = _block_absmax(blk)
        for v in blk.tolist():
            bounds = [float(s) * m if s > 0 else float("inf") for m in mids]
            code = sum(abs(v) >= t for t in bounds)
            nibbles.append(code | (8 if v < 0 and code else 0))
        scales.append(s)
    nibbles += [0] * (len(nibbles) % 2)
    packed = bytes(lo | hi << 4 for lo, hi in zip(nibbles[0::2], nibbles[1::2]))
    return packed + np.array(scales, np.float32).tobytes()


def ref_decode(name: str, buf: bytes, n: int, b: int) -> np.ndarray:
    k = n if name == "int8" else (n + 1) // 2
    scales = np.frombuffer(buf[k:], np.float32)
    if name == "int8":
        vals = np.frombuffer(buf[:k], np.int8).astype(np.float32)
    else:
        table = np.array([0] + [2.0 ** (c - 7) for c in range(1, 8)], np.float32)
        nib = np.frombuffer(buf[:k], np.uint8)
        nib = np.stack([nib & 15, nib >> 4], axis=1).reshape(-1)[:n]
        vals = np.where(nib & 8, -table[nib & 7], table[nib & 7]).astype(np.float32)
    with np.errstate(all="ignore"):
        return vals * np.repeat(scales, b)[:n]  # fp32 multiplication


REFS = {"int8": ref_int8, "fp4": ref_fp4}


def _bits(x: np.ndarray) -> np.ndarray:
    return np.array(x, np.float32).view(np.uint32)


def _f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _edge_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    up = lambda v: np.nextafter(np.float32(v), np.float32(np.inf))  # noqa: E731
    down = lambda v: np.nextafter(np.float32(v), np.float32(-np.inf))  # noqa: E731
    fp4_mid = [2.0**-7] + [1.5 * 2.0 ** (c - 8) for c in range(2, 8)]
    odd_scale = np.float32(1 + 2**-23)  # its midpoints are not representable in fp32
    cases = {
        "zeros": np.zeros(300, np.float32),
        "negative_zeros": -np.zeros(9, np.float32),
        "all_equal": np.full(300, 0.3, np.float32),
        "all_equal_negative": np.full(257, -2.5, np.float32),
        # absmax 127 -> int8 scale exactly 1: every k + 0.5 is a tie (to even).
        "int8_half_ties": _f32([127] + [k + 0.5 for k in range(-127, 127)]),
        "int8_half_ties_scaled": _f32([127 * 2.0**-10] + [(k + 0.5) * 2.0**-10 for k in range(-20, 20)]),
        # absmax 1 -> the fp4 midpoints exactly, and their neighbours.
        "fp4_ties": _f32([1.0] + [s * m for m in fp4_mid for s in (1, -1)]),
        "fp4_tie_neighbours": _f32([1.0] + [f(m) for m in fp4_mid for f in (up, down)]),
        "fp4_odd_scale": _f32(
            [odd_scale] + [f(np.float64(odd_scale) * m) for m in fp4_mid for f in (np.float32, up, down)]
        ),
        "subnormals": _f32([1e-45, -3e-45, 1e-40, -2e-39, 1.1e-38, 0.0, 5e-42]),
        "subnormal_with_normal": _f32([1e-40, 1.0, -1e-44, 1e-38]),
        # fp4 decode takes an exponent shortcut only while s * 2**-6 is normal: both sides.
        "fp4_scale_2e-120": _f32([2.0**-120] + [s * 2.0 ** (-120 - k) for k in range(7) for s in (1, -1)]),
        "fp4_scale_2e-121": _f32([2.0**-121] + [s * 2.0 ** (-121 - k) for k in range(7) for s in (1, -1)]),
        "fp4_scale_max": _f32([3.4028235e38, -1.7e38, 2.0**121, -(2.0**120), 1.0]),
        "huge": _f32([3.4e38, -3.4e38, 1e38, 1.0, -1e-30]),
        "inf": _f32([1.0, np.inf, -2.0, 0.0, 5.0]),
        "neg_inf": _f32([1.0, -np.inf, -2.0, 0.0, 5.0]),
        "nan": _f32([1.0, np.nan, -2.0, 0.0, 5.0]),
        "nan_and_inf": _f32([np.inf, np.nan, -np.inf, 3.0, -0.0]),
        "negative_nan": np.array([0xFFC00000, 0x3F800000, 0x7FC12345], np.uint32).view(np.float32),
        "odd_length": rng.standard_normal(1001).astype(np.float32),
        "one": _f32([-0.7]),
        "empty": np.zeros(0, np.float32),
    }
    for n in (2, 255, 256, 257, 4097, 70001):
        x = (rng.standard_normal(n) * rng.random(n) ** 6 * 10).astype(np.float32)
        cases[f"random_{n}"] = x
    return cases


CASES = _edge_cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size", [1, 7, 256])
@pytest.mark.parametrize("name", ["int8", "fp4"])
def test_block_codecs_match_reference(backend, name, block_size, case):
    x = CASES[case]
    if name == "fp4" and x.size > 5000 and block_size != 256:
        pytest.skip("the python fp4 reference is slow; large inputs run with block size 256")
    codec = get_codec(name, block_size)
    buf = codec.encode(torch.from_numpy(x.copy()))
    expected = REFS[name](x, block_size)
    assert buf.numpy().tobytes() == expected
    decoded = codec.decode(buf, x.size)
    assert np.array_equal(_bits(decoded.numpy()), _bits(ref_decode(name, expected, x.size, block_size)))


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "int8", "fp4"])
def test_numba_and_torch_paths_agree(name):
    if codec_kernels.numba is None:
        pytest.skip("numba not installed: nothing to compare the torch path with")
    before = codec_kernels.BACKEND
    x = np.concatenate([CASES[c] for c in sorted(CASES)])
    x = torch.from_numpy(x)
    results = {}
    try:
        for backend in ("torch", "numba"):
            codec_kernels.use_backend(backend)
            for b in (1, 7, 256):
                codec = get_codec(name, b)
                buf = codec.encode(x)
                results[backend, b] = (buf, codec.decode(buf, x.numel()).view(torch.int32))
    finally:
        codec_kernels.BACKEND = before
    for b in (1, 7, 256):
        assert torch.equal(results["torch", b][0], results["numba", b][0])
        assert torch.equal(results["torch", b][1], results["numba", b][1])


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "int8", "fp4"])
def test_out_buffers(backend, name):
    codec = get_codec(name, 7)
    x = torch.from_numpy(CASES["odd_length"])
    n, nbytes = x.numel(), codec.encoded_nbytes(x.numel())
    fresh = codec.encode(x)
    big = torch.full((nbytes + 1,), 0xAB, dtype=torch.uint8)
    out = big[1:]  # unaligned for a float view: still the same bytes
    assert codec.encode(x, out=out) is out
    assert torch.equal(out, fresh) and big[0] == 0xAB
    dec = torch.full((n,), 7.0)
    assert codec.decode(out, n, out=dec) is dec
    assert torch.equal(dec.view(torch.int32), codec.decode(fresh, n).view(torch.int32))
    with pytest.raises(ValueError, match="out="):
        codec.encode(x, out=torch.empty(nbytes + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out="):
        codec.decode(fresh, n, out=torch.empty(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 1, 100, (1 << 16) + 3, 3 << 17])
def test_all_finite_exact(backend, n):
    x = torch.randn(n)
    assert codec_kernels.all_finite(x) is True
    if n:
        x[-1] = 3.4e38
        x[0] = 1e-45
        assert codec_kernels.all_finite(x) is True
        for pos in {0, n // 2, n - 1}:
            for bad in (float("inf"), float("-inf"), float("nan")):
                y = x.clone()
                y[pos] = bad
                assert codec_kernels.all_finite(y) is False
        y = x.clone()
        y.view(torch.int32)[n // 3] = 0x7F800001  # a signalling NaN
        assert codec_kernels.all_finite(y) is False
    assert codec_kernels.all_finite(torch.full((3, 4), float("nan"))[:, 1]) is False  # strided


def test_torch_path_is_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(codec_kernels, "numba", None)
    monkeypatch.setattr(codec_kernels, "_warned", False)
    monkeypatch.setattr(codec_kernels, "BACKEND", "torch")
    with caplog.at_level(logging.WARNING, logger="dilo.codec_kernels"):
        for _ in range(3):
            get_codec("int8").encode(torch.ones(10))
            codec_kernels.all_finite(torch.ones(10))
    msgs = [r.getMessage() for r in caplog.records if "codec kernels" in r.getMessage()]
    assert msgs == ["codec kernels: numba not installed, using the torch path (pip install -e '.[fast]')"]
    with pytest.raises(ValueError, match="numba is not installed"):
        codec_kernels.use_backend("numba")
    with pytest.raises(ValueError, match="'numba' or 'torch'"):
        codec_kernels.use_backend("cuda")
