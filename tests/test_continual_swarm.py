"""data.watch on the swarm backend (docs/continual.md): shards agreed through the rounds, and a
peer that joins mid-stream continues at the manifest it downloads with the state."""

from __future__ import annotations

import pytest

from dilo.comm.swarm_round import agree_offers
from tools.bench_continual_join import scenario


def test_the_leader_answers_the_files_every_member_offered_past_the_newest_last():
    offers = [{"last": "a", "files": [["b", 5], ["c", 7], ["d", 1]]},
              {"last": "a", "files": [["b", 5], ["c", 8], ["d", 1], ["e", 2]]},
              {"last": "b", "files": [["c", 7], ["d", 1]]}]
    assert agree_offers(offers) == [["d", 1]]  # c differs in size, b is taken already, e unseen
    assert agree_offers(offers[:2]) == [["b", 5], ["d", 1]]
    assert agree_offers([offers[0], None]) is None  # a run without data.watch offers nothing


@pytest.mark.e2e
def test_an_endless_swarm_peer_joining_mid_stream_agrees_on_hash_and_manifest(tmp_path):
    """a and b train without end (run.steps 0) on a watched folder; a new shard arrives and is
    taken; c joins, downloading the state with its manifest; a third shard arrives, which c
    agrees on with the others (tools/bench_continual_join.py: it ends every peer it starts).
    Every outer step's hash is the same on every peer, and the versions all three published at
    one step after the join hold the same hash and consumed-data manifest."""
    res = scenario(tmp_path / "w", rounds_before=2, rounds_joined=2, rounds_after=2)
    a, b, c = (res["peers"][n] for n in "abc")
    assert [p["exit"] for p in (a, b, c)] == [0, 0, 0]
    assert res["every_step_hash_agrees"] and res["outer_steps_compared"] >= c["stopped_at"]
    assert a["joined_at"] is None and c["joined_at"] > a["taken_at_outer_step"]["shard-1.txt"]
    assert c["download"]["bytes"] > 0 and c["rounds_with_3_peers"] >= 4
    assert "shard-1.txt" not in c["taken_at_outer_step"]  # it came with the manifest
    taken = {p["taken_at_outer_step"]["shard-2.txt"] for p in (a, b, c)}
    assert len(taken) == 1  # the joiner took the third shard at the same step as the others
    assert res["version_hashes_agree"] and res["manifests_agree"]
    step = int(res["compared_version"].split("-")[1])
    assert step > c["joined_at"] and res["manifest"]["steps"] == 5 * step
    assert [s["name"] for s in res["manifest"]["shards"]] == ["shard-0.txt", "shard-1.txt", "shard-2.txt"]


class _Holder:
    outer_step, round_lag = 3, 0

    def export_state(self):
        import torch

        from dilo.comm.protocol import GlobalState

        return GlobalState(3, {"params": torch.arange(6, dtype=torch.float32)})


def test_a_donor_serves_its_manifest_and_refuses_a_joiner_with_another_lora_base():
    """In-process peers: the state download carries the manifest of the step it sends (and a
    downloader of a watched run refuses a donor without one); a LoRA base digest that differs
    from the donor's is refused (docs/adapters.md)."""
    from dilo.comm.swarm import SwarmGroup
    from dilo.comm.swarm_auth import AuthError, RunAuth
    from dilo.comm.swarm_node import RemoteError

    def peer(initial):
        return SwarmGroup(auth=RunAuth(b"k" * 20), settings={}, initial=initial,
                          listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=20.0)

    donor = peer([])
    joiner = None
    try:
        joiner = peer(donor.addresses[:1])
        donor.transfer.holder = _Holder()
        joiner.transfer.data_at = lambda step: None  # a watched run: a manifest is required
        with pytest.raises(RemoteError, match="no data manifest"):
            joiner.node.run(joiner.transfer._download(donor.name), timeout=30)
        donor.transfer.data_at = lambda step: {"outer_step": step, "cursor": 1}
        state = joiner.node.run(joiner.transfer._download(donor.name), timeout=30)
        assert state.outer_step == 3 and joiner.transfer.last_download["data"] == {"outer_step": 3, "cursor": 1}
        donor.transfer.base, joiner.transfer.base = "a" * 64, "b" * 64
        with pytest.raises(AuthError, match="LoRA base"):
            joiner.node.run(joiner.transfer._download(donor.name), timeout=30)
        joiner.transfer.base = "a" * 64
        assert joiner.node.run(joiner.transfer._download(donor.name), timeout=30).outer_step == 3
    finally:
        for p in (donor, joiner):
            if p is not None:
                p.close()
