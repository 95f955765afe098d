"""The two-phase exchange's owner error on request (issue 12)."""

from __future__ import annotations

import pytest
import torch

from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from dilo.comm.protocol import ExchangeBuffers, chunk_numel
from dilo.comm.two_phase import two_phase_average
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
