"""The two-phase exchange's owner error on request (issue 12)."""

from __future__ import annotations

import pytest
import torch

from dilo.aggregate import MeanByPieces
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from dilo.comm.protocol import ExchangeBuffers, chunk_numel
from dilo.comm.two_phase import piece_bounds, two_phase_average
from tests.helpers import run_workers


def vectors(num: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * (i + 1) for i in range(num)]


def owners_reference(vs: list[torch.Tensor], codec, rank: int) -> tuple[int, torch.Tensor]:
    """(offset, mean − decode(encode(mean))) of member `rank`'s chunk, written independently."""
    size, numel = len(vs), vs[0].numel()
    chunk = chunk_numel(numel, size, codec.block_size)
    lo, hi = rank * chunk, min((rank + 1) * chunk, numel)
    total = torch.zeros(chunk)
    for v in vs:
        part = torch.zeros(chunk)
        part[:hi - lo] = v[lo:hi]
        total += codec.decode(codec.encode(part), chunk)
    mean = total / size
    return lo, (mean - codec.decode(codec.encode(mean), chunk))[:hi - lo]


@pytest.mark.parametrize("name", ["int8", "fp4", "bf16"])
def test_owner_error_only_when_asked(name):
    codec, size = get_codec(name, 64), 3
    vs = vectors(size, 1000)
    groups = local_groups(size)
    asked = run_workers(lambda r: groups[r].average(vs[r].clone(), codec, owner_error=True), size)
    plain = run_workers(lambda r: groups[r].average(vs[r].clone(), codec), size)
    for r in range(size):
        assert torch.equal(asked[r].average, plain[r].average)
        assert asked[r].codec_error == plain[r].codec_error > 0  # the metric keeps its bits
        assert plain[r].owner_error is None
        lo, err = owners_reference(vs, codec, r)
        assert asked[r].owner_error[0] == lo and torch.equal(asked[r].owner_error[1], err)


def test_without_the_request_the_difference_goes_to_a_reused_chunk():
    """No fresh owner-error chunk per exchange: the difference behind codec_error reuses one buffer."""
    codec, size = get_codec("int8", 64), 2
    vs = vectors(size, 1000)
    groups = local_groups(size)
    bufs = [ExchangeBuffers() for _ in range(size)]

    def member(r):
        g = groups[r]
        ptrs = []
        for _ in range(2):
            res = two_phase_average(vs[r].clone(), codec, r, size, g._all_to_all, g._all_gather, buffers=bufs[r])
            assert res.owner_error is None
            ptrs.append(bufs[r].get("error", 1, torch.float32).data_ptr())
        return ptrs

    for ptrs in run_workers(member, size):
        assert ptrs[0] == ptrs[1]


# -- pieces (comm.pieces): the same bytes for any K --------------------------------------------
def test_piece_bounds_cut_on_block_boundaries_and_keep_the_byte_count():
    for name, block in [("int8", 64), ("fp4", 64), ("fp4", 3), ("int2", 16), ("bf16", 1), ("fp32", 1)]:
        codec = get_codec(name, block)
        for chunk in [block, 7 * block, 1000 * block]:
            chunk = chunk_numel(chunk, 1, codec.block_size)
            for k in [1, 2, 3, 8]:
                bounds = piece_bounds(chunk, codec, k)
                assert len(bounds) <= k and bounds[0][0] == 0
                assert sum(n for _, n in bounds) == chunk
                assert all(lo + n == nxt for (lo, n), (nxt, _) in zip(bounds, bounds[1:]))
                assert all(lo % codec.block_size == 0 and lo % 8 == 0 for lo, _ in bounds)
                assert sum(codec.encoded_nbytes(n) for _, n in bounds) == codec.encoded_nbytes(chunk)
    assert piece_bounds(7 * 64, get_codec("int8", 64), 3) == [(0, 192), (192, 192), (384, 64)]  # uneven last


def run_pieces(vs, codec, pieces, **named):
    size = len(vs)
    groups = local_groups(size, pieces=pieces)
    return run_workers(lambda r: groups[r].average(vs[r].clone(), codec, **named), size)


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "fp4", "int2"])
@pytest.mark.parametrize("size,numel", [(2, 1000), (3, 64 * 11 + 5)])
def test_any_number_of_pieces_gives_the_same_average_and_bytes(name, size, numel):
    """K = 1, 2, 3, 5: the same average, byte counts, owner errors and rejections (padding and an
    uneven last piece included); codec_error is summed over the pieces (its last bits may differ)."""
    codec = get_codec(name, 64)
    vs = vectors(size, numel, seed=size)
    base = run_pieces(vs, codec, 1, owner_error=True)
    for k in (2, 3, 5):
        got = run_pieces(vs, codec, k, owner_error=True)
        for a, b in zip(base, got):
            assert torch.equal(a.average, b.average)
            assert (a.bytes_sent, a.bytes_received, a.dropped) == (b.bytes_sent, b.bytes_received, b.dropped)
            assert (a.owner_error is None) == (b.owner_error is None)
            if a.owner_error is not None:
                assert a.owner_error[0] == b.owner_error[0] and torch.equal(a.owner_error[1], b.owner_error[1])
            assert b.codec_error == pytest.approx(a.codec_error, rel=1e-5, abs=1e-12)
            assert a.finite == b.finite


def test_pieces_with_reports_and_token_weights():
    from dilo.aggregate import Aggregate
    from dilo.comm.protocol import RoundReport

    codec, size = get_codec("int8", 64), 3
    vs = vectors(size, 64 * 9 + 3, seed=7)
    rule = Aggregate(weighting="tokens")

    def run(k):
        groups = local_groups(size, pieces=k)
        return run_workers(lambda r: groups[r].average(vs[r].clone(), codec, aggregate=rule,
                                                       report=RoundReport(100.0 * (r + 1), 5.0, 0.5)), size)
    base = run(1)
    for a, b in zip(base, run(3)):
        assert torch.equal(a.average, b.average) and a.reports == b.reports and a.bytes_sent == b.bytes_sent


@pytest.mark.parametrize("name", ["int8", "fp16", "fp32"])
def test_a_contribution_bad_in_a_later_piece_is_dropped_whole(name, monkeypatch):
    """Member 1's chunk for owner 0 is valid in its first pieces and non-finite (or, fp16,
    saturated then non-finite) in a later one: every K drops it whole, with the whole chunk's
    reason, so the owner sums its earlier pieces again."""
    codec, size, numel = get_codec(name, 64), 3, 64 * 30
    vs = vectors(size, numel, seed=3)
    chunk = chunk_numel(numel, size, 64)
    if name == "fp16":
        vs[1][100] = 70000.0  # saturated (clamped to the limit) in the first piece
    vs[1][chunk - 5] = float("nan")  # non-finite in the last piece of owner 0's chunk
    base = run_pieces(vs, codec, 1)
    again, sums = [], MeanByPieces.again
    monkeypatch.setattr(MeanByPieces, "again", lambda self: (again.append(1), sums(self)))
    for k in (2, 3):
        got = run_pieces(vs, codec, k)
        for a, b in zip(base, got):
            assert torch.equal(a.average, b.average)
            assert a.rejected == b.rejected and a.dropped == b.dropped
    assert base[0].rejected == [(1, "non-finite")] and base[1].rejected == []
    assert len(again) == (0 if name == "fp16" else 2)  # fp16: dropped (saturated) in its first piece


def test_pieces_over_gloo_with_posted_collectives():
    """The pipelined order (posted all-to-alls and all-gathers, `started`) on real gloo process
    groups, one per thread: the same average and bytes as K = 1 over the blocking collectives."""
    import datetime

    import torch.distributed as dist

    from dilo.comm.two_phase import started

    codec, size, numel = get_codec("fp4", 64), 3, 64 * 40 + 9
    vs = vectors(size, numel, seed=11)
    store = dist.HashStore()
    base = run_pieces(vs, codec, 1, owner_error=True)

    def member(r):
        pg = dist.ProcessGroupGloo(store, r, size, datetime.timedelta(seconds=60))
        posts = (lambda buf, out: started(pg.alltoall_base(out, buf, [], []), out),
                 lambda buf, out: started(pg._allgather_base(out, buf), out))
        return two_phase_average(vs[r].clone(), codec, r, size, None, None, pieces=3, posts=posts,
                                 owner_error=True)

    for a, b in zip(base, run_workers(member, size)):
        assert torch.equal(a.average, b.average) and a.bytes_sent == b.bytes_sent
        assert torch.equal(a.owner_error[1], b.owner_error[1])


def test_comm_pieces_is_checked():
    from dilo.config import parse_args

    base = ["--config", "configs/tiny.toml"]
    assert parse_args([*base, "--comm.pieces", "3"]).comm.pieces == 3
    for bad in ("0", "65"):
        with pytest.raises(ValueError, match=r"comm.pieces must be an integer in \[1, 64\]"):
            parse_args([*base, "--comm.pieces", bad])


@pytest.mark.parametrize("owner_feedback", [False, True])
def test_diloco_is_bit_identical_for_any_pieces_and_asks_for_the_owner_error_only_with_owner_feedback(
        owner_feedback, monkeypatch):
    """fp4 with error feedback (and owner feedback): θ after every outer step and the residuals are
    the same bytes with K = 1 and K = 3; the exchange hands back the owner error only when
    comm.owner_feedback reads it."""
    from dilo import DiLoCo
    from dilo.comm.local import LocalGroup
    from tests.helpers import Net, adamw, inner_step

    seen = []
    average = LocalGroup.average

    def spy(self, flat, codec, *args, **named):
        res = average(self, flat, codec, *args, **named)
        seen.append((named.get("owner_error", False), res.owner_error is not None))
        return res
    monkeypatch.setattr(LocalGroup, "average", spy)
    workers, H = 3, 3

    def run(pieces):
        groups = local_groups(workers, pieces=pieces)
        built = [Net() for _ in range(workers)]  # (torch.manual_seed is global: built before the threads)

        def worker(w):
            model, opt = built[w], adamw(built[w])
            d = DiLoCo(model, opt, inner_steps=H, codec=get_codec("fp4", 16), group=groups[w],
                       error_feedback=True, owner_feedback=owner_feedback)
            thetas = []
            for s in range(H * 3):
                inner_step(model, opt, w, s)
                if d.step() is not None:
                    thetas.append(d.global_params.clone())
            return thetas, d.fragments[0].residual.clone()
        return run_workers(worker, workers)

    one, three = run(1), run(3)
    for (ta, ra), (tb, rb) in zip(one, three):
        assert len(ta) == 3 and all(torch.equal(a, b) for a, b in zip(ta, tb))
        assert torch.equal(ra, rb)
    assert seen and set(seen) == {(owner_feedback, owner_feedback)}
