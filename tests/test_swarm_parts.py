"""The swarm backend's parts without training: keys, records, majorities, the reaper, and one
exchange between in-process peers in which one peer sends contributions of the wrong size."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import threading
import time

import pytest
import numpy as np
import torch

import hivemind  # noqa: E402,F401  (installed by the test extra)

from hivemind.dht.validation import DHTRecord  # noqa: E402

from dilo.codecs import get_codec  # noqa: E402
from dilo.comm.protocol import chunk_numel  # noqa: E402
from dilo.comm.two_phase import two_phase_average  # noqa: E402
from dilo.comm.reaper import _serve  # noqa: E402
from dilo.comm.swarm_auth import RunAuth, load_key, settings_mismatch  # noqa: E402
from dilo.comm.swarm_members import Member, View  # noqa: E402
from dilo.config import parse_args  # noqa: E402
from tests.helpers import swarm_trio  # noqa: E402


# -- keys, tokens, records ----------------------------------------------------------------
def test_run_key_sources_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DILO_RUN_KEY", raising=False)
    with pytest.raises(ValueError, match="needs a run key"):
        load_key("", open_swarm=False)
    assert load_key("", open_swarm=True) is None
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_key(str(short), open_swarm=False)
    with pytest.raises(ValueError, match="peers.key_file=.*missing"):
        load_key(str(tmp_path / "missing"), open_swarm=False)
    good = tmp_path / "run.key"
    good.write_text("0123456789abcdef-key\n")
    assert load_key(str(good), open_swarm=False) == b"0123456789abcdef-key"
    monkeypatch.setenv("DILO_RUN_KEY", "from-the-environment-123")
    assert load_key("", open_swarm=False) == b"from-the-environment-123"


def test_tokens_bind_the_key_to_a_peer_id():
    auth, other = RunAuth(b"k" * 20), RunAuth(b"x" * 20)
    token = auth.token(b"peer-a")
    assert auth.check(b"peer-a", token)
    assert not auth.check(b"peer-b", token)  # useless to any other peer
    assert not other.check(b"peer-a", token)
    assert not auth.check(b"peer-a", b"")
    assert auth.namespace != other.namespace and "." not in auth.namespace
    assert RunAuth(None).check(b"anyone", b"")


def test_records_are_signed_and_forgeries_refused():
    auth = RunAuth(b"k" * 20)
    validator = auth.validator()
    record = DHTRecord(b"key", b"subkey", b"value", 1234.5)
    signed = dataclasses.replace(record, value=validator.sign_value(record))
    assert validator.validate(signed) and validator.strip_value(signed) == b"value"
    for forged in (dataclasses.replace(signed, value=b"other" + signed.value[5:]),
                   dataclasses.replace(signed, expiration_time=9999.0),  # replayed with a later expiry
                   dataclasses.replace(signed, subkey=b"someone-else"),
                   record):  # unsigned
        assert not validator.validate(forged)
    assert not RunAuth(b"x" * 20).validator().validate(signed)


def test_settings_mismatch_names_the_keys():
    mine = parse_args(["--model.d_model", "32", "--model.n_heads", "2"]).shared_settings()
    theirs = parse_args(["--model.d_model", "64", "--model.n_heads", "2", "--comm.codec", "fp4"]).shared_settings()
    assert settings_mismatch(mine, mine) is None
    text = settings_mismatch(theirs, mine, "this peer", "the swarm")
    assert "model.d_model (this peer 64, the swarm 32)" in text and "comm.codec (this peer 'fp4'" in text


# -- the membership view ------------------------------------------------------------------
def member(peer, step, digest, pending=False):
    return Member(peer, step, digest, pending, training=True, done=False)


def test_view_majority_and_donors():
    view = View({m.peer: m for m in [member("a", 3, "x"), member("b", 3, "y"), member("c", 3, "y"),
                                     member("d", 2, "z"), member("e", 3, "y", pending=True)]}, {})
    assert view.majority_digest(3) == "y" and view.majority_digest(2) == "z" and view.majority_digest(9) is None
    assert [m.peer for m in view.donors(3, exclude="b")] == ["c", "e"]  # majority holders, regular first
    assert [m.peer for m in view.donors(0, exclude="zz")][0] == "b"  # the newest step wins
    assert view.donors(4, exclude="a") == []
    tie = View({m.peer: m for m in [member("b", 1, "q"), member("a", 1, "p")]}, {})
    assert tie.majority_digest(1) == "p"  # a tie goes to the smallest peer id


def test_view_rounds_are_apart_from_states():
    """With overlapped outer steps a peer's round is not its state's step: round formation
    reads the round fields, state transfer the step fields."""
    view = View({m.peer: m for m in [
        Member("a", 3, "s3", False, True, False, round=5, key="k"),
        Member("b", 3, "s3", False, True, False, round=5, key="k"),
        Member("c", 2, "s2", False, True, False, round=5, key="other"),
        Member("d", 4, "s4", False, True, False, round=6, key="k6"),
        Member("e", 1, "s1", True, True, False, round=9, key="")]}, {})  # a joiner, not in a round yet
    assert {m.peer for m in view.at_round(5)} == {"a", "b", "c"} and view.majority_key(5) == "k"
    assert view.newest_round("a") == 6 and view.newest_round("d") == 5  # e has no key: in no round yet
    assert view.at_round(9) == []
    assert view.majority_digest(3) == "s3" and [m.peer for m in view.donors(0, exclude="a")] == ["d"]


# -- config ---------------------------------------------------------------------------------
def test_peers_config_is_checked():
    cfg = parse_args(["--comm.backend", "hivemind", "--peers.initial", "/ip4/1.2.3.4/tcp/1/p2p/Qa, /dns/h/tcp/2/p2p/Qb",
                      "--run.steps", "100", "--outer.inner_steps", "10"])
    assert cfg.peers.initial == ["/ip4/1.2.3.4/tcp/1/p2p/Qa", "/dns/h/tcp/2/p2p/Qb"]
    for bad, message in [(["--peers.initial", "/ip4/1.2.3.4/tcp/1"], "lacks the peer id"),
                         (["--peers.listen", "0.0.0.0:1234"], "not a multiaddr"),
                         (["--peers.announce", "/ip4/1.2.3.4/tcp/0"], "explicit port"),
                         (["--peers.shard", "16"], "peers.shard"),
                         (["--comm.backend", "hivemind", "--run.steps", "101", "--outer.inner_steps", "10"],
                          "multiple of outer.inner_steps"),
                         (["--comm.backend", "hivemind", "--run.mode", "ddp"], "run.mode = diloco"),
                         (["--comm.backend", "hivemind", "--checkpoint.resume", "auto"], "checkpoint.resume")]:
        with pytest.raises(ValueError, match=message):
            parse_args(bad)


# -- the reaper -----------------------------------------------------------------------------
@pytest.mark.usefixtures("keep_signal_handlers")
def test_reaper_kills_watched_processes_and_removes_files_when_the_peer_is_gone(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    sock = tmp_path / "p2pd.sock"
    sock.write_text("")
    try:
        _serve(io.StringIO(f"pid {victim.pid}\npath {sock}\n"))  # end of input: the peer died
        assert victim.wait(timeout=10) is not None and not sock.exists()
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.usefixtures("keep_signal_handlers")
def test_reaper_leaves_everything_after_a_clean_shutdown(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    keep = tmp_path / "kept"
    keep.write_text("")
    try:
        _serve(io.StringIO(f"pid {bystander.pid}\npath {keep}\ndone\n"))
        assert keep.exists() and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# -- results of past rounds (overlapped outer steps) -----------------------------------------
class _ShortResult:
    """A cached result whose bytes are fewer than the values it claims (a bad peer's)."""

    def numel(self):
        return 10

    def contiguous(self):
        return self

    def numpy(self):
        return np.zeros(8, dtype=np.float32)


def test_a_bad_round_result_is_refused_and_counted_and_the_next_peer_serves_it():
    from dilo.comm.swarm import SwarmGroup

    counted = []

    def peer(initial, count=None):
        return SwarmGroup(auth=RunAuth(b"k" * 20), settings={}, initial=initial,
                          listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=20.0, count=count)

    fetcher = peer([], count=lambda name, value=1.0, **labels: counted.append(name))
    others = []
    try:
        others = [peer(fetcher.addresses[:1]) for _ in range(2)]
        bad, honest = others
        good = torch.arange(10, dtype=torch.float32)
        for p, pending, cached in ((bad, False, _ShortResult()), (honest, True, good)):
            # both went past round 3 (the honest one is asked last: pending peers come last)
            p.members.me.update(round=5, key="k", step=3, digest="d", training=True, pending=pending)
            p.rounds.position.step = 5
            p.results.keep = 4
            p.results.held[3] = ("k", cached, 2)
        for p in (fetcher, *others):
            p.node.run(p.members.start(), timeout=30)
        result = fetcher._fetch_result(3, "k")
        assert torch.equal(result.average, good) and result.num_peers == 2 and result.bytes_sent == 0
        assert counted == ["rejected_results", "round_results_fetched"]
        # a result of a round that started from another state is not taken: nobody can help
        assert fetcher.node.run(fetcher.results.fetch(3, "other-key", 10.0), timeout=30) is None
    finally:
        for p in (fetcher, *others):
            p.close()


def test_without_overlap_a_missed_round_is_taken_as_the_newer_state():
    """Without overlap (round_lag 0) no peer keeps results: a peer that adopted a state at the
    end of the run, with the donor's drain round in flight, asks for that round (DiLoCo's
    flush, RoundsInFlight.fetch_owed) and gets the swarm's newer state, checked, instead."""
    from dilo.comm.protocol import GlobalState
    from dilo.comm.swarm import SwarmGroup

    counted = []

    def peer(initial, count=None):
        return SwarmGroup(auth=RunAuth(b"k" * 20), settings={}, initial=initial,
                          listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=20.0, count=count)

    final = GlobalState(4, {"params": torch.arange(6, dtype=torch.float32)})
    fetcher = peer([], count=lambda name, value=1.0, **labels: counted.append((name, labels)))
    donor = None
    try:
        donor = peer(fetcher.addresses[:1])
        donor.holder = donor.transfer.holder = type("Holder", (), {"export_state": lambda self: final})()
        donor.members.me.update(round=3, key="k", step=4, digest=final.digest(), training=True, pending=False)
        donor.rounds.position.step = 4  # it went past round 3 (the drain round), and holds no results
        fetcher.members.me.update(round=3, key="k", step=3, digest="old", training=True, pending=False)
        for p in (fetcher, donor):
            p.node.run(p.members.start(), timeout=30)
        result = fetcher.round_result(3)
        assert result.adopted is not None and result.adopted.outer_step == 4
        assert torch.equal(result.adopted.tensors["params"], final.tensors["params"])
        assert ("state_downloads", {"reason": "missed_round"}) in counted
    finally:
        for p in (fetcher, donor):
            if p is not None:
                p.close()


# -- an exchange between in-process peers ---------------------------------------------------
def test_wrong_size_contribution_is_dropped_and_the_round_goes_on():
    from dilo.comm.swarm_exchange import to_bytes_view

    with swarm_trio() as (peers, groups):
        codec = get_codec("fp32")
        vectors = [torch.full((1000,), float(i + 1)) for i in range(3)]
        chunk = chunk_numel(1000, 3, codec.block_size)
        nbytes = codec.encoded_nbytes(chunk)
        poison = codec.encode(torch.full((chunk,), float("nan"))).numpy().tobytes()
        results: list = [None] * 3

        def run(i: int) -> None:
            p, g = peers[i], groups[i]

            def collective(phase, slices):
                got = p.node.run(g.collective(phase, slices, nbytes, poison, 30.0), timeout=60)
                return torch.frombuffer(bytearray(b"".join(got)), dtype=torch.uint8)

            def all_to_all(buf):
                slices = [to_bytes_view(s) for s in buf.view(3, -1)]
                if i == 2:  # the bad peer cuts its contributions to the others short
                    slices = [s if j == i else s[:-4] for j, s in enumerate(slices)]
                return collective(1, slices)

            def all_gather(buf):
                return collective(2, [to_bytes_view(buf)] * 3)

            results[i] = two_phase_average(vectors[i], codec, g.rank, 3, all_to_all, all_gather)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(r is not None for r in results)
        for r in results:
            assert torch.equal(r.average, results[0].average)
        # The two honest owners dropped peer 2's slice of their chunk: their chunks are the
        # mean of 1 and 2; peer 2's own chunk kept its own (right-sized) contribution.
        assert torch.equal(results[0].average[:chunk], torch.full((chunk,), 1.5))
        assert results[0].dropped == 1 and results[1].dropped == 1
        assert any(f"sent {nbytes - 4} bytes in phase 1, expected {nbytes}" in problem
                   for problem in groups[0].bad_slices)
    time.sleep(0.1)


def test_a_peer_without_the_key_or_with_other_settings_is_refused_on_both_sides(caplog):
    from dilo.comm.swarm import SwarmGroup

    mine = parse_args(["--model.d_model", "32", "--model.n_heads", "2"]).shared_settings()
    other = parse_args(["--model.d_model", "64", "--model.n_heads", "2"]).shared_settings()

    def peer(key, settings, initial, count=None):
        return SwarmGroup(auth=RunAuth(key), settings=settings, initial=initial,
                          listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=30.0, count=count)

    counted = []
    member = peer(b"k" * 20, mine, [], count=lambda name, value=1.0, **labels: counted.append((name, labels)))
    try:
        with pytest.raises(ValueError, match="does not hold the swarm's run key"):
            peer(b"x" * 20, mine, member.addresses[:1])
        with pytest.raises(ValueError, match=r"model.d_model \(this peer 64, the swarm 32\)"):
            peer(b"k" * 20, other, member.addresses[:1])
        deadline = time.time() + 10
        while len(counted) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert sorted(c[1]["reason"] for c in counted) == ["run key", "settings"]
        assert "it does not hold the run key" in caplog.text
        assert "model.d_model (this peer 32, that peer 64)" in caplog.text
    finally:
        member.close()


# -- the extra, the factory, the start event -------------------------------------------------
def test_importing_the_swarm_without_hivemind_says_how_to_install_it(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "hivemind", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "dilo.comm.swarm", raising=False)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[swarm\]'"):
        importlib.import_module("dilo.comm.swarm")


def test_from_config_builds_a_peer_that_counts_and_describes_itself(tmp_path):
    from dilo.comm.swarm import SwarmGroup

    key = tmp_path / "run.key"
    key.write_text("0123456789abcdef-key\n")
    cfg = parse_args(["--comm.backend", "hivemind", "--peers.key_file", str(key), "--run.dir", str(tmp_path / "a"),
                      "--peers.listen", "/ip4/127.0.0.1/tcp/0", "--run.steps", "100", "--outer.inner_steps", "10"])
    counted = []
    group = SwarmGroup.from_config(cfg, count=lambda name, value=1.0, **labels: counted.append((name, labels)))
    try:
        described = group.describe()
        assert described["peer"] == group.name and described["download"] is None
        assert described["addresses"] and all("/p2p/" in a for a in described["addresses"])
        assert (tmp_path / "a" / "address.txt").read_text().split() == described["addresses"]
        assert group.open_membership
        group._refused("someone", "run key")
        assert counted == [("refused_peers", {"reason": "run key"})]
    finally:
        group.close()


def test_linger_zero_ends_at_once():
    """peers.linger = 0 (allowed) used to raise UnboundLocalError at the end of a run."""
    from dilo.comm.swarm import SwarmGroup

    group = SwarmGroup(auth=RunAuth(b"k" * 20), settings={}, initial=[], listen=["/ip4/127.0.0.1/tcp/0"],
                       announce=[], timeout=20.0, linger=0.0)
    try:
        assert group.node.run(group.members.linger(5, 0.0), timeout=30) == []
    finally:
        group.close()
