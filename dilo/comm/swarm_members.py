"""Who is in the swarm and where each peer stands: signed membership records in the DHT.

Every peer keeps one record under `<namespace>.members`, subkey = its peer id:

    {"fp": settings fingerprint, "step": outer step of its global state, "digest": that
     state's hash, "round": the exchange it is in or enters next, "key": the digest of the
     state that exchange starts from, "pending": joined mid-round (others do not wait for
     it yet), "training": past the start gate, "done": finished the run (still serving),
     "left": gone}

Without overlapped outer steps round t starts from outer step t: "round" and "key" are
"step" and "digest", stored together. With overlap (DiLoCo's round_lag P) round t starts
from the state at outer step t − P while the previous rounds are in flight, and each
peer stores its round when it enters it.

It is re-stored every `heartbeat` seconds with an expiry of three heartbeats, and at once
whenever a field changes; a peer that stops refreshing (killed, cut off) drops out of
everyone's view within three heartbeats. Records are HMAC-signed (swarm_auth.py).
Records with another settings fingerprint are counted, not used: `View.foreign` lets a
joining peer refuse itself with a clear message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from dilo.comm.swarm_node import SwarmNode

log = logging.getLogger("dilo")

HEARTBEATS_TO_EXPIRE = 3


@dataclass(frozen=True)
class Member:
    peer: str
    step: int
    digest: str
    pending: bool
    training: bool
    done: bool
    min_peers: int = 1
    """Its peers.min_peers: a member at the start gate starts once that many are there."""
    round: int = 0
    key: str = ""


@dataclass
class View:
    """A snapshot of the live members (this peer included, from its own fields)."""

    members: dict[str, Member]
    foreign: dict[str, str]
    """peer -> settings fingerprint, for live records of other settings."""

    def at_step(self, step: int) -> list[Member]:
        """Members whose state is at `step` (those that have not published a digest yet excluded)."""
        return [m for m in self.members.values() if m.step == step and m.digest]

    def at_round(self, t: int) -> list[Member]:
        """Members in (or about to enter) round t that have published its key."""
        return [m for m in self.members.values() if m.round == t and m.key]

    def majority_key(self, t: int) -> str | None:
        """Most common key of round t; a tie goes to the key of the smallest peer id."""
        return _majority([(m.peer, m.key) for m in self.at_round(t)])

    def newest_round(self, exclude: str) -> int:
        """The latest round another member is in (past round t: it finished t, or took a newer
        state); -1 if none has published one."""
        return max((m.round for m in self.members.values() if m.key and m.peer != exclude), default=-1)

    def majority_digest(self, step: int) -> str | None:
        """Most common digest at `step`; a tie goes to the digest of the smallest peer id."""
        return _majority([(m.peer, m.digest) for m in self.at_step(step)])

    def donors(self, min_step: int, exclude: str) -> list[Member]:
        """Members holding the majority state of the newest step >= min_step, best first."""
        for step in sorted({m.step for m in self.members.values() if m.step >= min_step}, reverse=True):
            digest = self.majority_digest(step)
            found = sorted((m for m in self.at_step(step) if m.digest == digest and m.peer != exclude),
                           key=lambda m: (m.pending, m.peer))
            if found:
                return found
        return []


def _majority(votes: list[tuple[str, str]]) -> str | None:
    """The most common value of (peer, value) votes; a tie goes to the smallest peer's value."""
    if not votes:
        return None
    counts = Counter(value for _, value in votes)
    best = max(counts.values())
    return next(value for _, value in sorted(votes) if counts[value] == best)


class Membership:
    """This peer's record and everyone's (runs on the node's loop)."""

    def __init__(self, node: SwarmNode, fingerprint: str, heartbeat: float):
        self.node = node
        self.fingerprint = fingerprint
        self.heartbeat = heartbeat
        self.me = {"fp": fingerprint, "step": 0, "digest": "", "round": 0, "key": "", "pending": False,
                   "training": False, "done": False, "left": False, "min_peers": 1}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.publish()
        self._task = asyncio.create_task(self._refresh_forever())

    async def update(self, **fields) -> None:
        """Change this peer's record and store it now."""
        if any(self.me.get(k) != v for k, v in fields.items()):
            self.me.update(fields)
            await self.publish()

    async def publish(self) -> None:
        ok = await self.node.store("members", self.node.name, dict(self.me),
                                   ttl=self.heartbeat * HEARTBEATS_TO_EXPIRE)
        if not ok:
            log.debug("swarm: membership record not stored this time")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.publish()
            except Exception as e:  # the DHT may be briefly unreachable; try next beat
                log.debug("swarm: heartbeat failed: %r", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.me["left"] = True
        try:
            await asyncio.wait_for(self.publish(), timeout=5)
        except Exception as e:
            log.debug("swarm: could not publish departure: %r", e)

    async def view(self) -> View:
        records = await self.node.get_all("members")
        records[self.node.name] = dict(self.me)
        members, foreign = {}, {}
        for peer, r in records.items():
            try:
                if r.get("left"):
                    continue
                if r.get("fp") != self.fingerprint:
                    foreign[peer] = str(r.get("fp"))
                    continue
                members[peer] = Member(peer, int(r["step"]), str(r["digest"]), bool(r["pending"]),
                                       bool(r["training"]), bool(r["done"]), int(r.get("min_peers", 1)),
                                       int(r["round"]), str(r["key"]))
            except (KeyError, TypeError, ValueError):
                log.debug("swarm: malformed membership record from %s: %r", peer, r)
        return View(members, foreign)

    async def linger(self, outer_step: int, seconds: float) -> list[Member]:
        """Mark this peer done, then wait (at most `seconds`) until no live peer is behind
        `outer_step`: those may still download this peer's state. Returns those still behind."""
        loop = asyncio.get_running_loop()
        await self.update(done=True)
        until = loop.time() + seconds
        behind: list[Member] = []  # peers.linger = 0: nothing to wait for
        while loop.time() < until:
            view = await self.view()
            behind = [m for m in view.members.values() if m.step < outer_step and not m.done]
            if not behind:
                return []
            await asyncio.sleep(0.5)
        return behind
