"""The swarm side of issue 13 (docs/robust.md): a peer whose contributions are dropped in
several rounds in a row is refused from rounds for a while (in-process, no network)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("hivemind")

from dilo.comm.swarm_exchange import Refusals  # noqa: E402
from dilo.comm.swarm_round import Rounds  # noqa: E402


def test_refused_after_repeated_drops_for_a_while():
    r = Refusals(after=3, rounds=10)
    peers = ["a", "b", "liar"]
    assert r.record(0, peers, {"liar"}, me="a") == []
    assert r.record(1, peers, {"liar"}, me="a") == []
    assert r.record(2, peers, set(), me="a") == []  # a clean round resets the streak
    for t in (3, 4):
        assert r.record(t, peers, {"liar", "a"}, me="a") == []  # never counts itself
    assert r.record(5, peers, {"liar"}, me="a") == ["liar"]
    assert r.refused(6) == {"liar"} and r.refused(15) == {"liar"} and r.refused(16) == set()


class _Remote:
    def __init__(self, name: str):
        self.name = name

    def to_base58(self) -> str:
        return self.name


def test_a_leader_answers_a_refused_peers_join_with_refused():
    rounds = Rounds(node=None, members=None, timeout=5.0)
    rounds.refused = {"liar"}
    reply, _ = asyncio.run(rounds._on_join(_Remote("liar"), {"t": 0, "key": "k", "wait": 1.0}, None))
    assert reply == {"r": "refused"}
