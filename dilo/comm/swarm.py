"""The hivemind backend: independent `dilo train` processes form one run through a DHT.

    dilo train --config configs/tiny.toml --comm.backend hivemind            # first peer
    dilo train ... --comm.backend hivemind --peers.initial /ip4/.../p2p/...   # any other

hivemind provides the transport (libp2p: NAT-friendly, encrypted, authenticated peer
ids) and the DHT (who is in the run, where each peer stands). dilo's own code forms the
group of each round and runs the same two-phase exchange as the torch backend over it,
so the bytes and the invariants are the same (hivemind's matchmaking and all-reduce are
not used: they give time-window groups and partial averages; a DiLoCo round needs every
live peer, all-or-nothing, bit-identical results: swarm_round.py, swarm_exchange.py).

The pieces, one file each: swarm_node (loop thread, p2pd, DHT, RPC), swarm_auth (run
key, tokens, signed records), swarm_admission (hello: settings checked on both sides),
swarm_members (membership records), swarm_start (join or found the run), swarm_round
(group formation), swarm_exchange (one group's exchange and its mailboxes), swarm_results
(results of past rounds), swarm_state (state download), reaper (cleanup on a kill).

Life of a peer: start the node and say hello to `peers.initial` (a wrong key or other
run settings are refused here, on both sides) → `bind`: if the swarm is training,
download the global state and start from it (pending: the current round does not wait
for it); otherwise wait at the start gate for `peers.min_peers` peers, all starting from
the same seeded θ → every H steps `average`: one round (retried without peers that fail
it; alone, the peer applies its own Δ; behind, it downloads the newer state) → `confirm`
publishes the new digest → `finished` keeps serving the final state while live peers are
still behind (`peers.linger`) → `close` leaves (Ctrl-C leaves the same way).

With overlapped outer steps (`outer.overlap delayed|eager`, DiLoCo's round_lag P > 0)
rounds are applied P rounds after they run, so a state never stands alone: a peer that
takes one (joining, resyncing) also needs the results of the P rounds in flight, which
`round_result` fetches from the peers that ran them; a peer that is merely behind in a
round fetches that round's result instead of a state (swarm_results.py).

Importing this module without hivemind installed raises ImportError that says how to
install the extra.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Callable

import torch

if importlib.util.find_spec("hivemind") is None:  # checked without importing it (its logging is set first)
    raise ImportError("comm.backend = hivemind needs the swarm extra: pip install -e '.[swarm]'",
                      name="hivemind")

from dilo import atomic_write  # noqa: E402
from dilo.aggregate import Aggregate  # noqa: E402
from dilo.codecs import Codec  # noqa: E402
from dilo.comm.protocol import (ExchangeResult, GlobalState, Group, RoundId, RoundReport, SharedState,  # noqa: E402
                                alone, nothing_lost)
from dilo.comm.swarm_admission import Admission  # noqa: E402
from dilo.comm.swarm_auth import RunAuth, load_key, settings_fingerprint  # noqa: E402
from dilo.comm.swarm_exchange import Exchange, ExchangeFailed, Refusals, average_in_group  # noqa: E402
from dilo.comm.swarm_members import Membership  # noqa: E402
from dilo.comm.swarm_node import SwarmNode  # noqa: E402
from dilo.comm.swarm_results import RoundResults  # noqa: E402
from dilo.comm.swarm_round import Rounds  # noqa: E402
from dilo.comm.swarm_start import join_or_found, round_fields  # noqa: E402
from dilo.comm.swarm_state import StateTransfer  # noqa: E402

log = logging.getLogger("dilo")

Count = Callable[..., None]
"""count(name: str, value: float = 1.0, **labels): one counter event (the trainer's metrics)."""


def _no_count(name: str, value: float = 1.0, **labels) -> None:
    pass


MAX_ATTEMPTS = 8
"""Failed exchanges in one round before a peer gives up on the others and applies its own Δ."""


class SwarmGroup(Group):
    open_membership = True

    def __init__(self, *, auth: RunAuth, settings: dict, initial: list[str], listen: list[str],
                 announce: list[str], identity_file: str = "", min_peers: int = 1, heartbeat: float = 2.0,
                 linger: float = 30.0, timeout: float = 600.0, run_dir: str | None = None,
                 count: Count | None = None):
        self.rank, self.size = 0, 1
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self.min_peers, self.linger, self.timeout = min_peers, linger, timeout
        self.count: Count = count or _no_count
        """Metrics hook, called for each counter event (refusals, downloads, solo rounds, ...)."""
        self.holder: SharedState | None = None
        self.lag = 0
        """The holder's round_lag: 0, or P with overlapped outer steps."""
        self._digest = ""
        self._pending = True
        self._active: Exchange | None = None
        self._running_at = 0
        """Outer step a peer in peers.initial was training at when we said hello (0: none was):
        this peer then joins that run, and never starts a new one from step 0."""
        self.data_offer: Callable[[], dict] | None = None
        """data.watch (dilo/data_stream.py attach_swarm): the files this peer offers with each join."""
        self._agreed: list | None = None
        self.node = SwarmNode.start(auth, initial=initial, listen=listen, announce=announce,
                                    identity_file=identity_file, timeout=max(60.0, timeout / 4))
        try:
            self.node.on_refused = self._refused
            self.node.run(self._start_services(heartbeat), timeout=60)
            self.addresses = self.node.run(self.node.addresses(), timeout=30)
            self._announce(run_dir)
            if initial:
                self._running_at = self.admission.hello(initial)
        except BaseException:
            self.node.close()
            raise

    @classmethod
    def from_config(cls, cfg, count: Count | None = None) -> SwarmGroup:
        """This peer, started and admitted (`peers.*`, `comm.timeout`); count(name, value=1.0,
        **labels) receives each counter event (default: none are recorded)."""
        p = cfg.peers
        settings = {**cfg.shared_settings(), "run": {"steps": cfg.run.steps}}
        return cls(auth=RunAuth(load_key(p.key_file, p.open)), settings=settings, initial=p.initial,
                   listen=p.listen, announce=p.announce, identity_file=p.identity_file,
                   min_peers=p.min_peers, heartbeat=p.heartbeat, linger=p.linger, timeout=cfg.comm.timeout,
                   run_dir=cfg.run.dir, count=count)

    def describe(self) -> dict:
        """For the trainer's start event: this peer's id, its addresses, and its last state
        download (after bind: the one it joined with; None when it founded the run)."""
        return {"peer": self.name, "addresses": list(self.addresses), "download": self.transfer.last_download}

    async def _start_services(self, heartbeat: float) -> None:
        self.members = Membership(self.node, self.fingerprint, heartbeat)
        self.admission = Admission(self.node, self.members, self.settings, self._refused)
        self.transfer = StateTransfer(self.node, self.members, self.settings, self.timeout)
        self.rounds = Rounds(self.node, self.members, self.timeout)
        self.refusals = Refusals()
        self.results = RoundResults(self.node, self.members, self.rounds.position)
        await self.admission.start()
        await self.transfer.start()
        await self.rounds.start()
        await self.results.start()

    # -- identity and admission ----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.node.name

    @property
    def label(self) -> str:
        """A short, unique name for this peer's files and logs."""
        return "peer-" + self.name[-8:]

    def data_shard(self, num_shards: int) -> int:
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "little") % num_shards

    def _announce(self, run_dir: str | None) -> None:
        if run_dir:  # read while it is written: replaced atomically (not fsynced: it dies with the peer)
            text = "\n".join(self.addresses) + "\n"
            atomic_write.write_text(Path(run_dir) / "address.txt", text, durable=False)
        log.info("swarm peer %s; others join with --peers.initial %s", self.name, ",".join(self.addresses))

    def _refused(self, peer: str, reason: str, detail: str = "") -> None:
        log.warning("refused peer %s: %s", peer, detail or {"run key": "it does not hold the run key"}.get(reason, reason))
        self.count("refused_peers", reason=reason)

    # -- start: join a running swarm or found one ----------------------------------------
    def bind(self, state: SharedState) -> GlobalState | None:
        self.holder = self.transfer.holder = state
        self.lag = state.round_lag
        self.results.keep = 2 * self.lag + 2 if self.lag else 0  # a joiner fetches up to P of them
        joined, self._digest = self.node.run(
            join_or_found(self.members, self.transfer, self.rounds, state, min_peers=self.min_peers,
                          timeout=self.timeout, running_at=self._running_at), timeout=self.timeout + 60)
        if joined is None:
            self._pending = False
        else:
            info = self.transfer.last_download
            log.info("joined the swarm at outer step %d: state %.1f MB from %s in %.2f s (%.1f MB/s)",
                     joined.outer_step, info["bytes"] / 1e6, info["donor"][-8:], info["seconds"],
                     info["bytes"] / 1e6 / max(info["seconds"], 1e-9))
            self.count("state_downloads", reason="join")
        return joined

    # -- rounds --------------------------------------------------------------------------
    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        if round is None:
            raise TypeError("a swarm matches exchanges by their RoundId: pass round=")
        t, key = round.number, round.base
        suspects = self.refusals.refused(t)  # (issue 13: peers whose contributions were dropped repeatedly)
        offer = self.data_offer() if self.data_offer is not None else None
        self._agreed = None
        self.rounds.refused = set(suspects)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            outcome = self.node.run(self.rounds.form_group(t, key, suspects, offer), timeout=self.timeout + 120)
            # With overlap the round's result is all this peer needs, unless the others are more
            # than P rounds ahead: then it takes their newest state, or it would stay behind.
            if outcome.kind == "behind" and self.lag and outcome.ahead - t <= self.lag:
                fetched = self._fetch_result(t, key, owner_error)
                if fetched is not None:
                    return fetched
            if outcome.kind in ("behind", "resync"):
                state = self.node.run(self.transfer.catch_up(t, outcome.kind, self.lag), timeout=self.timeout + 120)
                if state is not None:
                    self.transfer.known_digest = None  # until confirm() publishes the adopted state's
                    self.count("state_downloads", reason=outcome.kind)
                    log.warning("round %d: %s; continuing from the swarm's state at outer step %d",
                                t, "the others went on without this peer" if outcome.kind == "behind"
                                else "this peer's state is not the majority's", state.outer_step)
                    self._pending = False
                    return ExchangeResult(torch.empty(0), 0, 0, 1, 0.0, adopted=state)
                continue
            if outcome.kind == "alone":
                self.rank, self.size = 0, 1
                self.count("solo_rounds")
                log.info("round %d: no other peer is in the round; applying this peer's own Δ", t)
                self._agreed = offer and offer["files"]
                self._finished(t, key, flat.clone(), 1)
                return alone(flat, report, owner_error)
            group = outcome.group
            try:
                result = self._exchange(group, flat, codec, aggregate or self.aggregate, report, owner_error)
            except BaseException as e:
                self.node.run(self.rounds.close_group(group, "aborted"), timeout=30)
                if not isinstance(e, ExchangeFailed):
                    raise
                self.count("partial_rounds")
                log.warning("round %d: exchange among %d peers failed (%s); nothing applied, retrying "
                            "with the live peers", t, group.size, e)
                suspects |= e.peers - {self.name}
                continue
            self.node.run(self.rounds.close_group(group, "done"), timeout=30)
            self.rank, self.size = group.rank, group.size
            self._pending = False
            for peer in self.refusals.record(t, group.peers, {p for p, _ in result.rejected}, self.name):
                log.warning("refusing peer %s from rounds %d..%d: its contributions were dropped in %d rounds "
                            "in a row", peer, t + 1, t + self.refusals.rounds, self.refusals.after)
                self.count("refused_peers", reason="dropped_contributions")
            self._finished(t, key, result.average, group.size)
            self._agreed = group.note
            return result
        log.warning("round %d: %d exchanges failed; applying this peer's own Δ (the digest majority "
                    "repairs it later if the others went on together)", t, MAX_ATTEMPTS)
        self.rank, self.size = 0, 1
        self.count("solo_rounds")
        self._finished(t, key, flat.clone(), 1)
        self._agreed = offer and offer["files"]
        return alone(flat, report, owner_error)

    def take_agreed(self) -> list | None:
        """data.watch: the [name, size] files the last round's group agreed on, once (None after an adoption)."""
        agreed, self._agreed = self._agreed, None
        return agreed

    def _finished(self, t: int, key: str, average: torch.Tensor, num_peers: int) -> None:
        if self.lag:  # (without overlap confirm() moves the peer on, and nobody fetches results)
            self.node.run(self.results.finished_round(t, key, average, num_peers), timeout=30)

    def _fetch_result(self, t: int, key: str | None, owner_error: bool = False) -> ExchangeResult | None:
        """Round t's result from a peer that ran it (overlap only; module docstring): it re-encoded nothing."""
        start = time.perf_counter()
        got = self.node.run(self.results.fetch(t, key, self.timeout), timeout=self.timeout + 60)
        for problem in self.results.bad_results:
            log.warning("refused %s", problem)
            self.count("rejected_results")
        self.results.bad_results.clear()
        if got is None:
            return None
        average, num_peers, nbytes = got
        self._finished(t, "" if key is None else key, average, num_peers)
        self.count("round_results_fetched")
        log.info("round %d: took the result of %d peers (%.1f MB) instead of an exchange", t, num_peers,
                 nbytes / 1e6)
        return ExchangeResult(average, 0, nbytes, num_peers, time.perf_counter() - start,
                              owner_error=nothing_lost() if owner_error else None)

    def round_result(self, number: int) -> ExchangeResult:
        """A round that was in flight when this peer adopted a state (it joined, or resynced)."""
        if (fetched := self._fetch_result(number, None)) is not None:
            return fetched
        state = self.node.run(self.transfer.catch_up(number, "resync", self.lag), timeout=self.timeout + 120)
        if state is None:
            raise RuntimeError(f"round {number}: no peer holds its result any more and no peer could serve "
                               f"the swarm's state within comm.timeout={self.timeout:.0f} s")
        self.transfer.known_digest = None
        self.count("state_downloads", reason="missed_round")
        log.warning("round %d: no peer holds its result any more; continuing from the swarm's state at "
                    "outer step %d", number, state.outer_step)
        return ExchangeResult(torch.empty(0), 0, 0, 1, 0.0, adopted=state)

    def _exchange(self, group: Exchange, flat: torch.Tensor, codec: Codec, aggregate: Aggregate,
                  report: RoundReport | None = None, owner_error: bool = False) -> ExchangeResult:
        def dropped(problem: str) -> None:
            log.warning("round %d: dropped a contribution: %s", group.t, problem)
            self.count("rejected_contributions", reason="wrong_size")

        self._active = group
        try:
            result = average_in_group(self.node, group, flat, codec, self.timeout, dropped, aggregate, report,
                                      owner_error)
            result.rejected = [(group.peers[m], why) for m, why in result.rejected]  # name the peers
            return result
        finally:
            self._active = None

    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        self._digest = digest
        return self.node.run(self._confirm(outer_step, digest), timeout=self.timeout + 60)

    async def _confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        self.transfer.known_digest = (outer_step, digest)
        if not self.lag:  # the next round starts from this state (with overlap it started already)
            self.rounds.set_step(outer_step)
        # Publish and look at the others' records at once (a backstop: the next round's
        # entry compares digests again, when everyone's records are in).
        _, view = await asyncio.gather(
            self.members.update(step=outer_step, digest=digest, pending=self._pending, training=True,
                                **round_fields(self.lag, outer_step, digest)),
            self.members.view())
        majority = view.majority_digest(outer_step)
        if majority is None or majority == digest:
            return None
        self.count("state_downloads", reason="repair")
        self.transfer.known_digest = None
        state = await self.transfer.fetch(outer_step)
        if state is not None:  # the algorithm adopts exactly this state
            self._digest = self.transfer.last_download["digest"]
            self.transfer.known_digest = (state.outer_step, self._digest)
            if not self.lag:
                self.rounds.set_step(state.outer_step)
            await self.members.update(step=state.outer_step, digest=self._digest,
                                      **round_fields(self.lag, state.outer_step, self._digest))
        return state

    # -- end -----------------------------------------------------------------------------
    def finished(self) -> None:
        """The run is over here: serve the final state while live peers are still behind."""
        behind = self.node.run(self.members.linger(self.holder.outer_step, self.linger), timeout=self.linger + 60)
        if behind:
            log.warning("stopped serving after peers.linger=%.0f s; peers still behind: %s", self.linger,
                        ", ".join(m.peer[-8:] for m in behind))

    def close(self) -> None:
        """Leave the swarm: tell the others, stop the daemon, remove its files. Idempotent."""
        if self.node is None:
            return
        try:
            if self._active is not None:
                self.node.run(self.rounds.close_group(self._active, "aborted"), timeout=10)
            self.node.run(self.members.stop(), timeout=10)
        except Exception as e:
            log.debug("swarm: leaving: %r", e)
        finally:
            self.node.close()
            self.node = None

    # -- the fixed-rank operations of Group do not exist in a swarm ----------------------
    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        raise RuntimeError("a swarm has no fixed ranks: the starting state comes from bind()")

    def all_gather_object(self, obj: object) -> list:
        raise RuntimeError("a swarm has no fixed ranks: members compare digests through confirm()")
