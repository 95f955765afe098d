"""`Group.average(owner_error=True)` must fill `ExchangeResult.owner_error` (the Group contract,
dilo/comm/protocol.py; docs/design.md): every built-in group does, and DiLoCo refuses a group
that does not instead of running owner feedback without it."""

from __future__ import annotations

import pytest
import torch

from dilo import DiLoCo
from dilo.codecs import get_codec
from dilo.comm.hierarchical import HierarchicalGroup
from dilo.comm.local import LocalGroup, local_groups
from dilo.comm.protocol import ExchangeResult, Group, RoundReport, SoloGroup, alone, chunk_numel
from tests.helpers import Net, adamw, inner_step, run_workers


class Forgetful(Group):
    """A group written before the contract: it takes `owner_error=` and never fills the result."""

    def __init__(self, inner: Group):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size

    def average(self, flat, codec, round=None, aggregate=None, report=None, owner_error=False) -> ExchangeResult:
        res = self.inner.average(flat, codec, aggregate=aggregate, report=report, owner_error=owner_error)
        res.owner_error = None
        return res

    def broadcast(self, flat, src=0):
        self.inner.broadcast(flat, src)

    def all_gather_object(self, obj):
        return self.inner.all_gather_object(obj)


def train(groups: list[Group], codec, owner_feedback: bool, rounds: int = 2, H: int = 2) -> list[torch.Tensor]:
    """Each worker's θ after `rounds` outer steps with error feedback."""
    built = [Net() for _ in groups]  # (torch.manual_seed is global: built before the threads)

    def worker(w):
        model, opt = built[w], adamw(built[w])
        d = DiLoCo(model, opt, inner_steps=H, codec=codec, group=groups[w], error_feedback=True,
                   owner_feedback=owner_feedback)
        for s in range(H * rounds):
            inner_step(model, opt, w, s)
            d.step()
        return d.global_params.clone()
    return run_workers(worker, len(groups))


def test_diloco_refuses_a_group_that_does_not_fill_the_owner_error():
    codec = get_codec("int8", 16)
    with pytest.raises(ValueError, match=r"Forgetful\.average\(owner_error=True\) returned no "
                                         r"ExchangeResult\.owner_error: .*set comm\.owner_feedback = false"):
        train([Forgetful(g) for g in local_groups(2)], codec, owner_feedback=True)
    thetas = train([Forgetful(g) for g in local_groups(2)], codec, owner_feedback=False)  # not asked: runs
    assert torch.equal(thetas[0], thetas[1])


def test_a_member_that_owns_no_element_hands_back_an_empty_owner_error(monkeypatch):
    """Net has 371 parameters; with 256-element blocks and 3 workers member 2's chunk starts past
    the end: its owner error is empty (it re-encoded nothing), and DiLoCo runs on."""
    seen = {}
    average = LocalGroup.average

    def spy(self, flat, codec, *args, **named):
        res = average(self, flat, codec, *args, **named)
        if named.get("owner_error"):
            seen[self.rank] = (res.owner_error[0], res.owner_error[1].numel(), flat.numel())
        return res
    monkeypatch.setattr(LocalGroup, "average", spy)
    codec = get_codec("int8", 256)
    thetas = train(local_groups(3), codec, owner_feedback=True)
    assert all(torch.equal(t, thetas[0]) for t in thetas)
    numel = seen[0][2]
    chunk = chunk_numel(numel, 3, 256)
    assert 2 * chunk >= numel > chunk  # (the premise: member 2 owns nothing)
    assert seen == {0: (0, chunk, numel), 1: (chunk, numel - chunk, numel), 2: (numel, 0, numel)}


@pytest.mark.parametrize("name", ["fp32", "sparse"])
def test_every_exchange_fills_the_owner_error_when_asked(name):
    """A lossless codec's owner error is zeros over the member's chunk; an all-gather re-encodes
    nothing (empty); unasked, both leave it None."""
    size, numel = 3, 1000
    codec = get_codec(name, 64, sparse_block=64)
    vs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(size)]
    groups = local_groups(size)
    asked = run_workers(lambda r: groups[r].average(vs[r].clone(), codec, owner_error=True), size)
    plain = run_workers(lambda r: groups[r].average(vs[r].clone(), codec), size)
    chunk = chunk_numel(numel, size, codec.block_size)
    for r in range(size):
        assert torch.equal(asked[r].average, plain[r].average) and plain[r].owner_error is None
        offset, error = asked[r].owner_error
        if codec.exchange == "gather":
            assert (offset, error.numel()) == (0, 0)
        else:
            assert offset == r * chunk and torch.equal(error, torch.zeros(min(chunk, numel - offset)))


def test_a_lone_member_lost_nothing_and_islands_refuse_the_request():
    flat = torch.randn(10)
    report = RoundReport(tokens=5.0, steps=2.0)
    for res in (SoloGroup().average(flat, get_codec("int8"), report=report, owner_error=True),
                alone(flat, report, True)):
        assert torch.equal(res.average, flat) and res.reports == [(5.0, 2.0, 0.0)]
        assert res.owner_error[0] == 0 and res.owner_error[1].numel() == 0
    assert SoloGroup().average(flat, get_codec("int8")).owner_error is None
    islands = object.__new__(HierarchicalGroup)  # (it raises before touching a process group)
    with pytest.raises(ValueError, match="comm.owner_feedback does not reach islands yet"):
        islands.average(flat, get_codec("int8"), owner_error=True)
