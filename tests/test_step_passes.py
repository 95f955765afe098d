"""The outer step's fused statistics and its threaded digest change no bit of what is hashed
or sent (docs/results.md, "Seventh pass"): Δ, max |Δ|, the owner's re-encode loss, θ and
the momentum are compared bit for bit with straightforward torch; the logged sums of
squares (‖Δ‖, codec_error) with an fp64 reference to fp32 precision; the digest with one
BLAKE3 over the joined bytes, for 1 and 2 threads."""

from __future__ import annotations

import math

import blake3
import numpy as np
import pytest
import torch

from dilo import codec_kernels
from dilo.aggregate import why_unsendable
from dilo.comm.local import local_groups
from dilo.comm.protocol import state_digest
from dilo.comm.two_phase import two_phase_average
from dilo.fragments import Fragment
from dilo.reduce_kernels import max_abs
from tests.helpers import diloco_pair, numba_skip, run_workers

NO_NUMBA, needs_numba = numba_skip("no kernel to compare with the torch path")


def _values(n: int, seed: int, specials: tuple = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    for i, v in enumerate(specials):
        x[(i * 7919) % n] = v
    return x


_EDGE = (0.0, -0.0, 1e-45, -1e-40, 1.1754942e-38, 3e38, -3e38, 1.0, -1.0)


def _sumsq(x: torch.Tensor) -> float:
    return float((x.double() ** 2).sum())


@needs_numba
@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 3 * 4096 + 5, 100_003])
@pytest.mark.parametrize("special", [None, math.inf, -math.inf, math.nan])
def test_sub_with_max_abs_is_torch_sub_and_max_abs(n, special, backend):
    backend("numba")
    a = _values(n, 1, _EDGE[: max(0, n - 3)])
    b = _values(n, 2, _EDGE[::-1][: max(0, n - 3)])
    if special is not None:
        b[n // 2] = special
    out = torch.full((n,), 123.0)
    largest, sumsq = codec_kernels.sub_with_max_abs(a, b, out)
    want = a - b
    assert np.array_equal(out.numpy().view(np.uint32), want.numpy().view(np.uint32))
    ref = max_abs(want)
    assert (math.isnan(largest) and math.isnan(ref)) or largest == ref
    if special is None:
        assert sumsq == pytest.approx(_sumsq(want), rel=1e-5, abs=0.0)
        assert largest == float(want.abs().max())


@needs_numba
@pytest.mark.parametrize("n", [1, 4096, 4097, 100_003])
def test_sub_with_sumsq_is_torch_sub_and_its_norms(n, backend):
    backend("numba")
    mean, dst = _values(n, 3, _EDGE[: max(0, n - 3)]), _values(n, 4)
    errors = torch.empty(n)
    sq_mean, sq_err = codec_kernels.sub_with_sumsq(mean, dst, errors)
    assert np.array_equal(errors.numpy().view(np.uint32), (mean - dst).numpy().view(np.uint32))
    assert sq_mean == pytest.approx(_sumsq(mean), rel=1e-5)
    assert sq_err == pytest.approx(_sumsq(mean - dst), rel=1e-5)


def test_kernels_decline_what_they_do_not_handle(backend):
    a, b, out = torch.ones(8), torch.ones(8), torch.empty(8)
    assert codec_kernels.sub_with_max_abs(a.double(), b.double(), out.double()) is None
    assert codec_kernels.sub_with_max_abs(torch.ones(8, 2)[:, 0], b, out) is None  # not contiguous
    assert codec_kernels.sub_with_sumsq(a, b, torch.empty(7)) is None
    backend("torch")
    assert codec_kernels.sub_with_max_abs(a, b, out) is None and codec_kernels.sub_with_sumsq(a, b, out) is None


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_pseudo_gradient_statistics(kernels, backend):
    """Δ is `θ − live` bit for bit on either path; max |Δ| is `max_abs(Δ)` (NaN wins over any
    piece); ‖Δ‖ is torch's norm on the torch path, the kernel's fp64-summed one otherwise."""
    if kernels == "numba" and codec_kernels.numba is None:
        pytest.skip(NO_NUMBA)
    backend(kernels)
    params = [torch.nn.Parameter(_values(n, 10 + n)) for n in (5000, 3, 9000)]
    frag = Fragment(0, params, 0.7, 0.9, True, eager=False, error_feedback=False)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(_values(p.numel(), 20 + i))
        params[1][1] = math.nan
    for bad in (True, False):
        delta = frag.pseudo_gradient(reuse=True)
        want = frag.theta.detach() - torch.cat([p.detach() for p in params])
        assert np.array_equal(delta.numpy().view(np.uint32), want.numpy().view(np.uint32))
        if kernels == "torch":
            norm = want.norm().item()
            assert frag.delta_max_abs is None
            assert math.isnan(frag.delta_norm) if bad else frag.delta_norm == norm
            assert why_unsendable(delta, _codec("int8"), frag.delta_max_abs) == why_unsendable(delta, _codec("int8"))
        else:
            ref = max_abs(want)
            assert math.isnan(frag.delta_max_abs) if bad else frag.delta_max_abs == ref
            if not bad:
                assert frag.delta_norm == pytest.approx(math.sqrt(_sumsq(want)), rel=1e-6)
            assert why_unsendable(delta, _codec("int8"), frag.delta_max_abs) == why_unsendable(delta, _codec("int8"))
        with torch.no_grad():
            params[1][1] = 0.5


def _codec(name):
    from dilo.codecs import get_codec
    return get_codec(name)


@pytest.mark.parametrize("codec", ["int8", "fp4", "fp32"])
@pytest.mark.parametrize("pieces", [1, 3])
def test_codec_error_and_owner_error_against_reference(codec, pieces, backend):
    """The owner error handed back is `mean − decode(encode(mean))` bit for bit (the torch path
    gives the same bytes), codec_error = ‖error‖ / ‖mean‖ to fp32 precision, on both paths."""
    results = {}
    for kernels in (["numba"] if codec_kernels.numba is not None else []) + ["torch"]:
        backend(kernels)
        members = 3
        groups = local_groups(members)
        xs = [_values(10_000 + 37, 30 + r) for r in range(members)]

        def run(r, groups=groups, xs=xs, codec=codec, members=members):
            g = groups[r]
            return two_phase_average(xs[r], _codec(codec), r, members, g._all_to_all, g._all_gather,
                                     owner_error=True, pieces=pieces)
        results[kernels] = run_workers(run, members)
    for got in results.values():
        for res, ref in zip(got, results["torch"]):  # the torch path: dilo.codecs' torch code, torch.sub
            offset, error = res.owner_error
            assert torch.equal(res.average, ref.average) and offset == ref.owner_error[0]
            assert np.array_equal(error.numpy().view(np.uint32), ref.owner_error[1].numpy().view(np.uint32))
            assert res.codec_error == pytest.approx(ref.codec_error, rel=1e-5, abs=1e-12)
    for r, res in enumerate(results["torch"]):  # and an fp64 reference: ‖mean − decoded‖ / ‖mean‖
        offset, error = res.owner_error
        chunk = res.average[offset:offset + error.numel()]
        mean = chunk.double() + error.double()  # the owner's mean, exactly (fp32 + fp32 in fp64)
        want = math.sqrt(_sumsq(error)) / math.sqrt(float((mean ** 2).sum())) if error.numel() else 0.0
        assert res.codec_error == pytest.approx(want, rel=1e-4, abs=1e-12)


def test_state_digest_is_one_blake3_for_any_thread_count():
    tensors = [_values(3_000_001, 40), _values(1_000_000, 41), torch.zeros(0)]
    joined = b"".join(t.numpy().tobytes() for t in tensors) + (17).to_bytes(8, "little")
    want = blake3.blake3(joined).hexdigest()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert state_digest(tensors, 17) == want
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("codec", ["int8", "fp4"])
def test_diloco_kernels_and_torch_path_reach_the_same_state(codec, backend):
    """Two in-process workers, three outer steps: θ, momentum and the digest are the same bits
    with the fused kernels as on the torch path; the logged ‖Δ‖ agrees to fp32 precision."""
    if codec_kernels.numba is None:
        pytest.skip(NO_NUMBA)
    out = {}
    for kernels in ("numba", "torch"):
        backend(kernels)
        out[kernels] = [(theta, mom, [(s.global_hash, s.pseudo_grad_norm) for s in stats])
                        for theta, mom, stats, _ in diloco_pair(codec, local_groups(2))]
    for r in range(2):
        (theta, mom, st), (theta_t, mom_t, st_t) = out["numba"][r], out["torch"][r]
        assert torch.equal(theta, theta_t) and torch.equal(mom, mom_t)
        assert [h for h, _ in st] == [h for h, _ in st_t]
        assert [n for _, n in st] == pytest.approx([n for _, n in st_t], rel=1e-5)


@needs_numba
def test_kernels_on_several_threads_give_the_same_bits_and_sums(backend):
    """Sliced over torch's threads (whole 4096-element blocks each), the difference has the same
    bits and max |d|, the sums of squares the same value, as on one thread."""
    backend("numba")
    n = (1 << 20) * 3 + 4099
    a, b = _values(n, 50, _EDGE), _values(n, 51)
    before, got = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, errors = torch.empty(n), torch.empty(n)
            got.append((codec_kernels.sub_with_max_abs(a, b, out), codec_kernels.sub_with_sumsq(a, b, errors),
                        out.numpy().view(np.uint32).copy(), errors.numpy().view(np.uint32).copy()))
    finally:
        torch.set_num_threads(before)
    want = (a - b).numpy().view(np.uint32)
    for stats, sums, out, errors in got:
        assert (stats, sums) == got[0][:2]
        assert np.array_equal(out, want) and np.array_equal(errors, want)
    assert got[0][0][0] == max_abs(a - b)


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "none", "no_stale", "no_stale_nan"])
def test_eager_step_asks_finiteness_once_with_the_same_bits(case):
    """The eager copy's step (overlap = eager) checks the average's finiteness with one pass
    (codec_kernels.all_finite) instead of two `torch.isfinite(...).all()`: the same θ bits
    as the statement written with torch (docs/streaming.md's Δ̃)."""
    n, members = 5000, 3
    params = [torch.nn.Parameter(_values(n, 60))]
    frag = Fragment(0, params, 0.7, 0.9, True, eager=True, error_feedback=False)
    fresh, stale = _values(n, 61) * 1e-2, _values(n, 62) * 1e-2
    average = None if case == "none" else _values(n, 63) * 1e-2
    if case in ("nan", "no_stale_nan"):
        average[17] = math.nan
    if case == "inf":
        average[4000] = -math.inf
    if case.startswith("no_stale"):
        stale = None
    ref = torch.nn.Parameter(frag.eager_theta.detach().clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    ok = average is not None and bool(torch.isfinite(average).all())
    own = stale if stale is not None else (average if ok else torch.zeros(n))
    proxy = (fresh - own) / members
    if ok:
        proxy = proxy + average
    ref.grad = proxy
    opt.step()
    frag.eager_step(fresh, stale, average, members)
    assert np.array_equal(frag.eager_theta.detach().numpy().view(np.uint32), ref.detach().numpy().view(np.uint32))
