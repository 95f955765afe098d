"""Who is in the swarm and where each peer stands: signed membership records in the DHT.

Every peer keeps one record under `<namespace>.members`, subkey = its peer id:

    {"fp": settings fingerprint, "step": outer step of its global state, "digest": that
     state's hash, "pending": joined mid-round (others do not wait for it yet),
     "training": past the start gate, "done": finished the run (still serving), "left": gone}

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


@dataclass
class View:
    """A snapshot of the live members (this peer included, from its own fields)."""

    members: dict[str, Member]
    foreign: dict[str, str]
    """peer -> settings fingerprint, for live records of other settings."""

    def at_step(self, step: int) -> list[Member]:
        """Members whose state is at `step` (those that have not published a digest yet excluded)."""
        return [m for m in self.members.values() if m.step == step and m.digest]

    def max_step(self) -> int:
        return max((m.step for m in self.members.values()), default=-1)

    def majority_digest(self, step: int) -> str | None:
        """Most common digest at `step`; a tie goes to the digest of the smallest peer id."""
        holders = sorted(self.at_step(step), key=lambda m: m.peer)
        if not holders:
            return None
        counts = Counter(m.digest for m in holders)
        best = max(counts.values())
        return next(m.digest for m in holders if counts[m.digest] == best)

    def donors(self, min_step: int, exclude: str) -> list[Member]:
        """Members holding the majority state of the newest step >= min_step, best first."""
        for step in sorted({m.step for m in self.members.values() if m.step >= min_step}, reverse=True):
            digest = self.majority_digest(step)
            found = sorted((m for m in self.at_step(step) if m.digest == digest and m.peer != exclude),
                           key=lambda m: (m.pending, m.peer))
            if found:
                return found
        return []


class Membership:
    """This peer's record and everyone's (runs on the node's loop)."""

    def __init__(self, node: SwarmNode, fingerprint: str, heartbeat: float):
        self.node = node
        self.fingerprint = fingerprint
        self.heartbeat = heartbeat
        self.me = {"fp": fingerprint, "step": 0, "digest": "", "pending": False, "training": False,
                   "done": False, "left": False, "min_peers": 1}
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
                                       bool(r["training"]), bool(r["done"]), int(r.get("min_peers", 1)))
            except (KeyError, TypeError, ValueError):
                log.debug("swarm: malformed membership record from %s: %r", peer, r)
        return View(members, foreign)
