"""int2 and sparse against plain-Python references written from their specification
(dilo/codec_lowbit.py's docstring), and the sparse codec's properties the exchange relies on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.aggregate import Aggregate
from dilo.codecs import get_codec
from dilo.config import parse_args
from dilo.comm.local import local_groups
from tests.helpers import SMALL, Net, inner_step, run_workers, summaries, torchrun_cmd

F32 = np.float32


# -- references ------------------------------------------------------------------------------
def ref_int2(x: np.ndarray, b: int) -> bytes:
    codes, scales = [], []
    for start in range(0, len(x), b):
        blk = x[start:start + b]
        s = F32(math.sqrt(math.fsum(float(v) ** 2 for v in blk) / b))
        divisor = s if s > 0 else F32(1)
        for v in blk:
            w = F32(v) / divisor
            w = F32(0) if w != w else w
            codes.append(int(min(max(math.floor(w), -2), 1)) + 2)
        scales.append(s)
    codes += [0] * (-len(codes) % 4)
    packed = bytes(sum(codes[4 * j + i] << (2 * i) for i in range(4)) for j in range(len(codes) // 4))
    return packed + np.array(scales, dtype=F32).tobytes()


def ref_int2_decode(buf: bytes, n: int, b: int) -> np.ndarray:
    payload = -(-n // 4)
    scales = np.frombuffer(buf[payload:], dtype=F32)
    out = np.empty(n, dtype=F32)
    for i in range(n):
        c = (buf[i // 4] >> (2 * (i % 4))) & 3
        out[i] = F32(c - 1.5) * scales[i // b]
    return out


def sparse_params(b: int, density: float, vb: int) -> tuple[int, int]:
    """(k, l): entries kept per block, low bits per offset."""
    k = max(1, min(b, math.floor(density * b + 0.5)))
    return k, int(math.floor(math.log2(b // k)))


def block_bits(r: int, k: int, low: int, vb: int) -> tuple[int, int, int]:
    kept = min(k, r)
    upper = kept + ((r - 1) >> low) + 1
    return kept, upper, upper + kept * (low + vb)


def ref_sparse(x: np.ndarray, b: int, density: float, vb: int) -> bytes:
    """Finite input only: top-k by |x| (ties to the lower index), Elias–Fano offsets."""
    k, low = sparse_params(b, density, vb)
    levels = 2 ** (vb - 1)
    payload, scales = b"", []
    for start in range(0, len(x), b):
        blk = x[start:start + b]
        kept_n, upper, total = block_bits(len(blk), k, low, vb)
        kept = sorted(sorted(range(len(blk)), key=lambda i: (-abs(float(blk[i])), i))[:kept_n])
        mags = [F32(abs(blk[i])) for i in kept]
        s = max(mags)
        m = min(mags) if len(blk) >= k else F32(0)
        step = F32(s - m) / F32(levels - 1)
        acc = 0
        for j, i in enumerate(kept):
            q = 0
            if step > 0:
                q = min(max(math.floor(F32(F32(F32(mags[j] - m) / step) + F32(0.5))), 0), levels - 1)
            acc |= 1 << ((i >> low) + j)
            acc |= (i % (1 << low)) << (upper + j * low)
            acc |= (int(blk[i] < 0) | (q << 1)) << (upper + kept_n * low + j * vb)
        payload += acc.to_bytes(-(-total // 8), "little")
        scales += [m, s]
    return payload + np.array(scales, dtype=F32).tobytes()


def ref_sparse_decode(buf: bytes, n: int, b: int, density: float, vb: int) -> np.ndarray:
    k, low = sparse_params(b, density, vb)
    blocks = -(-n // b)
    shapes = [block_bits(min(b, n - r * b), k, low, vb) for r in range(blocks)]
    sizes = [-(-total // 8) for _, _, total in shapes]
    scales = np.frombuffer(buf[sum(sizes):], dtype=F32).reshape(blocks, 2)
    out = np.zeros(n, dtype=F32)
    offset = 0
    for r, (kept, upper, _) in enumerate(shapes):
        acc = int.from_bytes(buf[offset:offset + sizes[r]], "little")
        offset += sizes[r]
        m, s = scales[r]
        step = F32(s - m) / F32(2 ** (vb - 1) - 1)
        highs = [p - j for j, p in enumerate(p for p in range(upper) if acc >> p & 1)]
        assert len(highs) == kept
        for j, high in enumerate(highs):
            i = (high << low) | ((acc >> (upper + j * low)) & ((1 << low) - 1))
            field = (acc >> (upper + kept * low + j * vb)) & ((1 << vb) - 1)
            mag = F32(F32(field >> 1) * step) + m
            out[r * b + i] = -mag if field & 1 else mag
    return out


def sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]
    x[::53] = 0.0  # zeros, and ties among them
    x[7::91] = 0.5  # exact ties at a kept magnitude
    x[8::91] = -0.5
    return x


# -- the formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,b", [(1, 8), (7, 8), (8, 8), (1000, 64), (1000, 7), (4096 + 50, 256)])
def test_int2_matches_the_reference(n, b):
    x = sample(n, seed=n)
    codec = get_codec("int2", b)
    buf = codec.encode(x)
    assert bytes(buf.numpy()) == ref_int2(x.numpy(), b)
    assert np.array_equal(codec.decode(buf, n).numpy(), ref_int2_decode(bytes(buf.numpy()), n, b))


def test_int2_levels_and_layout():
    codec = get_codec("int2", 4)
    x = torch.tensor([1.0, -1.0, 1.0, -1.0])  # RMS 1: codes 3 (1.5), 1 (-0.5) as floor(±1) = 1, -1
    buf = codec.encode(x)
    assert buf[0].item() == 3 | (1 << 2) | (3 << 4) | (1 << 6)
    assert codec.decode(buf, 4).tolist() == [1.5, -0.5, 1.5, -0.5]
    assert buf[1:].clone().view(torch.float32).tolist() == [1.0]


@pytest.mark.parametrize("n,b,density,vb", [
    (1, 16, 0.25, 2), (5, 16, 0.5, 2), (16, 16, 0.25, 4), (100, 16, 0.25, 8), (1000, 64, 0.05, 2),
    (1000, 64, 0.05, 4), (4096 * 2 + 30, 4096, 0.02, 2), (4096 + 100, 4096, 0.02, 2),  # short block >= k, < k
    (300, 100, 1.0, 2), (777, 1000, 0.001, 8),
])
def test_sparse_matches_the_reference(n, b, density, vb):
    x = sample(n, seed=n + b)
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)
    buf = codec.encode(x)
    assert buf.numel() == codec.encoded_nbytes(n)
    assert bytes(buf.numpy()) == ref_sparse(x.numpy(), b, density, vb)
    assert np.array_equal(codec.decode(buf, n).numpy(), ref_sparse_decode(bytes(buf.numpy()), n, b, density, vb))


def test_sparse_keeps_k_per_block_and_its_extremes_exactly():
    codec = get_codec("sparse", density=0.25, value_bits=2, sparse_block=8)
    x = torch.tensor([0.1, -4.0, 0.2, 3.0, 0.0, 0.3, 0.0, 0.0] + [0.0] * 8)
    y = codec.decode(codec.encode(x), x.numel())
    assert y.tolist() == [0.0, -4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0] + [0.0] * 8  # k = 2; m = 3, s = 4: exact
    assert codec.keep == 2 and codec.low_bits == 2


def test_sparse_is_the_same_with_zero_padding():
    """The exchange may pad a vector to whole blocks: a short block then decodes the same."""
    for n in (4096 + 50, 4096 + 3000, 10):
        x = sample(n, seed=1)
        codec = get_codec("sparse")
        padded = torch.cat([x, torch.zeros(-n % 4096)])
        direct = codec.decode(codec.encode(x), n)
        via_pad = codec.decode(codec.encode(padded), padded.numel())[:n]
        assert torch.equal(direct, via_pad)


def test_sparse_decode_range_is_a_slice_of_decode():
    codec = get_codec("sparse", density=0.05, value_bits=4, sparse_block=64)
    n = 64 * 40 + 17
    buf = codec.encode(sample(n, seed=3))
    whole = codec.decode(buf, n)
    for lo, hi in [(0, n), (64, 640), (128, n), (64 * 40, n), (0, 1), (640, 640)]:
        assert torch.equal(codec.decode_range(buf, n, lo, hi), whole[lo:hi])
    with pytest.raises(ValueError, match="block-aligned"):
        codec.decode_range(buf, n, 3, 70)


def test_sparse_refuses_a_malformed_payload():
    codec = get_codec("sparse", density=0.25, sparse_block=8)
    buf = codec.encode(torch.arange(16.0))
    bad = buf.clone()
    bad[0] ^= 0xFF  # the first block's bitmap: the wrong number of offsets
    with pytest.raises(ValueError, match="malformed"):
        codec.decode(bad, 16)


def test_sparse_marks_non_finite_blocks():
    codec = get_codec("sparse", density=0.25, sparse_block=8)
    x = torch.ones(24)
    x[2], x[9] = float("nan"), float("inf")
    y = codec.decode(codec.encode(x), 24)
    assert not torch.isfinite(y[:8]).all() and not torch.isfinite(y[8:16]).all() and torch.isfinite(y[16:]).all()
    marker = codec.decode(codec.encode(torch.full((100,), float("nan"))), 100)
    assert not torch.isfinite(marker).all()  # the no-contribution marker stays a marker


@pytest.mark.parametrize("kwargs,needle", [
    ({"density": 0.0}, "comm.density must be in \\(0, 1\\]"), ({"density": 1.5}, "comm.density"),
    ({"value_bits": 3}, "comm.value_bits must be one of 2, 4, 8"),
    ({"sparse_block": 1}, "comm.sparse_block must be an integer in \\[2, 65536\\]"),
    ({"sparse_block": 1 << 17}, "comm.sparse_block"),
])
def test_sparse_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        get_codec("sparse", **kwargs)


def test_sizes_against_fp4():
    """2% of blocks of 4096 with 2-bit values: 82 entries, 5 low bits, a 210-bit bitmap, 8 bytes of scales."""
    n = 4096 * 100
    sparse, fp4, int2 = (get_codec(c).encoded_nbytes(n) for c in ("sparse", "fp4", "int2"))
    assert sparse == 100 * (math.ceil((82 + 128 + 82 * (5 + 2)) / 8) + 8)
    assert fp4 / sparse > 19 and int2 == n // 4 + 4 * (n // 256)


# -- the gather exchange (dilo/comm/gather.py) --------------------------------------------------
def decoded(x: torch.Tensor, b: int, density: float, vb: int) -> torch.Tensor:
    """Reference round trip of one contribution (finite input)."""
    n = x.numel()
    return torch.from_numpy(ref_sparse_decode(ref_sparse(x.numpy(), b, density, vb), n, b, density, vb))


def exchange(xs: list[torch.Tensor], codec, aggregate=None, **named):
    groups = local_groups(len(xs))
    return run_workers(lambda r: groups[r].average(xs[r], codec, aggregate=aggregate, **named), len(xs))


@pytest.mark.parametrize("members,numel", [(2, 1000), (3, 64 * 7 + 5), (4, 64 * 16), (4, 30)])
def test_gather_mean_is_the_plain_mean_of_the_decoded_contributions(members, numel):
    b, density, vb = 64, 0.1, 4
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)
    xs = [sample(numel, seed=10 + m) for m in range(members)]
    results = exchange(xs, codec)
    total = torch.zeros(numel)
    for x in xs:  # member order, one fp32 add at a time, then the division
        total += decoded(x, b, density, vb)
    expected = total / members
    for r in results:
        assert torch.equal(r.average, expected)  # bit-identical on every member, and the reference
        assert r.bytes_sent == r.bytes_received == (members - 1) * codec.encoded_nbytes(numel)
        assert r.codec_error == 0.0 and r.dropped == 0 and r.num_peers == members


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "clip"])
def test_gather_runs_the_owners_rules_the_same_everywhere(rule):
    b, density, vb, numel, members = 64, 0.2, 8, 64 * 10, 5
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)
    xs = [sample(numel, seed=20 + m) for m in range(members)]
    xs[3] = xs[3] * 100  # an outlier worker
    results = exchange(xs, codec, Aggregate(rule, trim=1, clip_ratio=2.0))
    parts = torch.stack([decoded(x, b, density, vb) for x in xs])
    values = parts.sort(dim=0).values
    if rule == "median":
        expected = values[2]
    elif rule == "trimmed_mean":
        expected = (values[1] + values[2] + values[3]) / 3
    else:
        norms = [float(torch.tensor([p.double().norm().item()], dtype=torch.float32)) for p in parts]
        cap = 2.0 * sorted(norms)[2]
        scale = [min(1.0, cap / n) for n in norms]
        expected = sum(p * s for p, s in zip(parts, scale)) / members
    for r in results:
        assert torch.equal(r.average, results[0].average)
        assert torch.allclose(r.average, expected, rtol=1e-5, atol=1e-6)
    if rule == "clip":
        assert [m for m, _ in results[0].clipped] == [3]


def test_gather_drops_a_no_contribution_marker():
    b, density, vb, numel = 64, 0.1, 2, 64 * 6
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)
    xs = [sample(numel, seed=30 + m) for m in range(3)]
    xs[1] = torch.full((numel,), float("nan"))
    results = exchange(xs, codec)
    total = torch.zeros(numel)
    total += decoded(xs[0], b, density, vb)
    total += decoded(xs[2], b, density, vb)
    for r in results:
        assert torch.equal(r.average, total / 2)
        assert r.dropped == 1 and r.rejected == [(1, "non-finite")]


# -- DiLoCo with the sparse codec: error feedback always on, against a reference --------------
def _make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _step(model, opt, w, s):
    g = torch.Generator().manual_seed(1000 * w + s)
    nn.functional.mse_loss(model(torch.randn(8, 8, generator=g)), torch.randn(8, 4, generator=g)).backward()
    opt.step()
    opt.zero_grad()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("beta,momentum", [(1.0, 0.9), (0.9, 0.0)])
def test_diloco_sparse_matches_a_reference_with_error_feedback(beta, momentum):
    """Workers keep e ← (Δ + βe) − decode(encode(Δ + βe)) even with error_feedback=False; θ follows
    SGD (Nesterov, or none: SparseLoCo) on the plain mean of the decoded contributions, bit for
    bit on every worker."""
    H, rounds, workers, b, density, vb = 3, 4, 3, 64, 0.1, 2
    make, step, flat = _make, _step, _flat
    # reference: no dilo
    theta = make()
    outer = torch.optim.SGD(theta.parameters(), lr=0.7, momentum=momentum, nesterov=momentum > 0)
    models = [make() for _ in range(workers)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    residual = [torch.zeros(flat(theta).numel()) for _ in range(workers)]
    history = []
    for r in range(rounds):
        total = torch.zeros_like(residual[0])
        for w in range(workers):
            models[w].load_state_dict(theta.state_dict())
            for s in range(H):
                step(models[w], opts[w], w, r * H + s)
            sent = (flat(theta) - flat(models[w])) + (residual[w] if beta == 1.0 else beta * residual[w])
            got = decoded(sent, b, density, vb)
            residual[w] = sent - got
            total += got
        mean, offset = total / workers, 0
        for p in theta.parameters():
            p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        outer.step()
        history.append(flat(theta).clone())

    groups = local_groups(workers)
    codec = get_codec("sparse", density=density, value_bits=vb, sparse_block=b)

    built = [make() for _ in range(workers)]  # here: torch.manual_seed is global, threads would race

    def worker(w):
        model = built[w]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        d = DiLoCo(model, opt, inner_steps=H, codec=codec, group=groups[w], error_feedback=False,
                   ef_decay=beta, outer_momentum=momentum, nesterov=momentum > 0)
        assert d.fragments[0].residual is not None  # sparse turns it on
        seen = []
        for s in range(H * rounds):
            step(model, opt, w, s)
            if d.step() is not None:
                seen.append(d.global_params.clone())
        return seen

    for seen in run_workers(worker, workers):
        assert len(seen) == rounds
        for got, want in zip(seen, history):
            assert torch.equal(got, want)


@pytest.mark.e2e
def test_torchrun_with_the_sparse_codec(procs, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "10", "--outer.inner_steps", "5",
            "--comm.codec", "sparse", "--comm.density", "0.05", "--comm.value_bits", "2",
            "--checkpoint.every", "0"]
    res = procs.run(torchrun_cmd(2, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert len(found) == 2 and len({s["global_hash"] for s in found}) == 1
    assert all(math.isfinite(s["final_eval_loss"]) for s in found)
    nbytes = get_codec("sparse", density=0.05, value_bits=2).encoded_nbytes(found[0]["synced_params"])
    assert all(s["bytes_sent"] == 2 * nbytes == s["bytes_received"] for s in found)  # 2 syncs, 1 peer


# -- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--comm.density", "0"], "comm.density must be in"),
    (["--comm.value_bits", "3"], "comm.value_bits must be one of 2, 4, 8"),
    (["--comm.sparse_block", "1"], "comm.sparse_block must be an integer"),
    (["--comm.codec", "sparse", "--comm.ef_decay", "0"], "comm.ef_decay \\(β\\) must be in \\(0, 1\\]"),
    (["--comm.codec", "sparse", "--comm.backend", "hivemind", "--peers.open", "true"],
     "comm.codec = sparse needs comm.backend = torch"),
])
def test_config_refuses_bad_sparse_settings(args, needle):
    with pytest.raises(ValueError, match=needle):
        parse_args([*SMALL, *args])


def test_sparse_settings_are_shared_only_with_the_sparse_codec():
    int8 = parse_args([*SMALL, "--comm.density", "0.5"]).shared_settings()["comm"]
    assert "density" not in int8  # other codecs' fingerprints are what they were
    sparse = parse_args([*SMALL, "--comm.codec", "sparse", "--comm.density", "0.05"]).shared_settings()["comm"]
    assert sparse["density"] == 0.05 and sparse["value_bits"] == 2 and sparse["sparse_block"] == 4096


def test_ef_decay_without_error_feedback_warns(caplog):
    parse_args([*SMALL, "--comm.ef_decay", "0.9"])  # accepted: one set of flags may serve several codecs
    groups = local_groups(2)

    def worker(w):
        torch.manual_seed(0)
        model = nn.Linear(4, 4)
        return DiLoCo(model, torch.optim.AdamW(model.parameters()), inner_steps=2, codec="int8",
                      group=groups[w], ef_decay=0.9).fragments[0].residual

    with caplog.at_level("WARNING", logger="dilo"):
        assert run_workers(worker, 2) == [None, None]
    assert "comm.ef_decay = 0.9 has no effect" in caplog.text


def test_owner_feedback_sends_the_owners_rounding_again():
    """int2, two-phase, error feedback and owner feedback against a reference of the exchange:
    owner j averages chunk j of the decoded contributions, re-encodes it once, and adds
    M · (mean_j − decode(encode(mean_j))) to its own residual."""
    H, rounds, workers, b = 3, 4, 3, 16
    codec = get_codec("int2", b)
    theta = _make()
    numel = _flat(theta).numel()
    chunk = math.ceil(math.ceil(numel / workers) / b) * b
    outer = torch.optim.SGD(theta.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    models = [_make() for _ in range(workers)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    residual = [torch.zeros(numel) for _ in range(workers)]
    history = []
    for r in range(rounds):
        sent = []
        for w in range(workers):
            models[w].load_state_dict(theta.state_dict())
            for s in range(H):
                _step(models[w], opts[w], w, r * H + s)
            x = (_flat(theta) - _flat(models[w])) + residual[w]
            residual[w] = x - codec.decode(codec.encode(x), numel)
            sent.append(torch.cat([x, torch.zeros(chunk * workers - numel)]))
        average = torch.zeros(chunk * workers)
        for j in range(workers):
            total = torch.zeros(chunk)
            for w in range(workers):
                total += codec.decode(codec.encode(sent[w][j * chunk:(j + 1) * chunk]), chunk)
            mean = total / workers
            got = codec.decode(codec.encode(mean), chunk)
            average[j * chunk:(j + 1) * chunk] = got
            lo, hi = j * chunk, min((j + 1) * chunk, numel)
            if lo < numel:
                residual[j][lo:hi] += (mean - got)[:hi - lo] * workers
        offset = 0
        for p in theta.parameters():
            p.grad = average[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        outer.step()
        history.append(_flat(theta).clone())

    groups = local_groups(workers)

    built = [_make() for _ in range(workers)]  # here: torch.manual_seed is global, threads would race

    def worker(w):
        model = built[w]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        d = DiLoCo(model, opt, inner_steps=H, codec=codec, group=groups[w], error_feedback=True,
                   owner_feedback=True)
        seen = []
        for s in range(H * rounds):
            _step(model, opt, w, s)
            if d.step() is not None:
                seen.append(d.global_params.clone())
        return seen, d.fragments[0].residual

    for w, (seen, res) in enumerate(run_workers(worker, workers)):
        for got, want in zip(seen, history):
            assert torch.equal(got, want)
        assert torch.equal(res, residual[w])


def test_owner_feedback_is_refused_where_it_cannot_work():
    owner = [*SMALL, "--comm.owner_feedback", "true"]
    for extra, why in ((["--comm.codec", "int8"], "set comm.error_feedback = true"),
                       (["--comm.codec", "fp32"], "comm.codec = fp32 loses nothing"),
                       (["--comm.codec", "sparse"], "set comm.sparse_exchange = two_phase"),
                       (["--comm.codec", "int2", "--comm.error_feedback", "true", "--run.mode", "ddp"],
                        "only apply to run.mode = diloco"),
                       (["--comm.codec", "int2", "--comm.error_feedback", "true", "--run.worker_size", "2"],
                        "islands")):
        with pytest.raises(ValueError, match=why):
            parse_args([*owner, *extra])
    for extra in (["--comm.codec", "int2", "--comm.error_feedback", "true"],
                  ["--comm.codec", "bf16", "--comm.error_feedback", "true"],
                  ["--comm.codec", "sparse", "--comm.sparse_exchange", "two_phase"]):  # sparse: always EF
        assert parse_args([*owner, *extra]).comm.owner_feedback


def test_bench_sparse_bytes_counts_what_dilo_sends(tmp_path):
    from tools import bench_sparse_bytes

    out = tmp_path / "bytes.json"
    assert bench_sparse_bytes.main(["--quick", "--out", str(out), "--png", ""]) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    sparse = get_codec("sparse")
    for row in rows:
        m, n = row["members"], row["numel"]
        assert row["sparse gather"] == (m - 1) * sparse.encoded_nbytes(n)
        assert row["fp4 over"]["sparse gather"] == row["fp4"] / row["sparse gather"]
    assert rows[1]["members"] == 4 and rows[1]["fp4 over"]["sparse gather"] > 8  # the goal at M = 4


def test_sparse_two_phase_reencodes_each_owners_mean_once():
    """comm.sparse_exchange = two_phase: chunk j's owner averages the decoded chunk-j pieces and
    re-sparsifies the mean; every member decodes the same bytes."""
    b, members, numel = 64, 3, 64 * 10 + 7
    codec = get_codec("sparse", density=0.1, value_bits=4, sparse_block=b, sparse_exchange="two_phase")
    xs = [sample(numel, seed=40 + m) for m in range(members)]
    results = exchange(xs, codec, owner_error=True)
    chunk = math.ceil(math.ceil(numel / members) / b) * b
    expected = torch.zeros(chunk * members)
    for j in range(members):
        total = torch.zeros(chunk)
        for x in xs:
            piece = torch.cat([x, torch.zeros(chunk * members - numel)])[j * chunk:(j + 1) * chunk]
            total += decoded(piece, b, 0.1, 4)
        expected[j * chunk:(j + 1) * chunk] = decoded(total / members, b, 0.1, 4)
    for r in results:
        assert torch.equal(r.average, expected[:numel])
        assert r.bytes_sent == 2 * (members - 1) * codec.encoded_nbytes(chunk)
        assert r.owner_error is not None and r.owner_error[1].abs().max() > 0  # the re-sparsify's loss
    with pytest.raises(ValueError, match="comm.sparse_exchange must be one of gather, two_phase"):
        get_codec("sparse", sparse_exchange="ring")
    parse_args([*SMALL, "--comm.codec", "sparse", "--comm.sparse_exchange", "two_phase", "--comm.owner_feedback",
                "true"])  # sparse runs error feedback anyway


def test_diloco_sparse_two_phase_with_owner_feedback_stays_identical():
    workers, H = 3, 3
    codec = get_codec("sparse", density=0.1, value_bits=2, sparse_block=64, sparse_exchange="two_phase")
    groups = local_groups(workers)
    built = [_make() for _ in range(workers)]

    def worker(w):
        model = built[w]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        d = DiLoCo(model, opt, inner_steps=H, codec=codec, group=groups[w], owner_feedback=True)
        hashes = []
        for s in range(H * 4):
            _step(model, opt, w, s)
            if d.step() is not None:
                hashes.append(d.global_hash())
        return hashes

    found = run_workers(worker, workers)
    assert len(found[0]) == 4 and found[0] == found[1] == found[2]


@pytest.mark.parametrize("overlap", ["none", "eager"])
def test_sparse_with_streaming_fragments_and_overlap_stays_identical(overlap):
    """Fragments, τ and eager overlap with the gather exchange on the background thread."""
    workers, H = 3, 4
    groups = local_groups(workers)
    built = [Net() for _ in range(workers)]  # here: torch.manual_seed is global, threads would race
    codec = get_codec("sparse", density=0.1, sparse_block=64)

    def worker(w):
        model = built[w]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        d = DiLoCo(model, opt, inner_steps=H, codec=codec, group=groups[w], fragments=2, delay=1,
                   overlap=overlap, ef_decay=0.9, outer_momentum=0.0, nesterov=False, outer_lr=2.0)
        hashes = []
        try:
            for s in range(H * 4):
                inner_step(model, opt, w, s)
                if d.step() is not None:
                    hashes.append(d.global_hash())
            d.flush()
            hashes.append(d.global_hash())
        finally:
            d.close()
        return hashes

    found = run_workers(worker, workers)
    assert len(found[0]) >= 6 and found[0] == found[1] == found[2]


def test_diloco_refuses_owner_feedback_where_it_cannot_act():
    """The Python API refuses what the config refuses: a lossless codec, no error feedback, the gather."""
    for codec, ef, message in ((get_codec("fp32"), False, "loses nothing"),
                               (get_codec("int8"), False, "comm.error_feedback = true"),
                               (get_codec("sparse"), True, "comm.sparse_exchange = two_phase")):
        groups = local_groups(2)

        def worker(w, codec=codec, ef=ef, groups=groups):
            model = _make()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            DiLoCo(model, opt, inner_steps=2, codec=codec, group=groups[w], owner_feedback=True, error_feedback=ef)

        with pytest.raises(ValueError, match=message):
            run_workers(worker, 2)
