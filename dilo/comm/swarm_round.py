"""Group formation: which peers average together in each round of the swarm.

Group formation (one leader per round, no clocks)
-------------------------------------------------
Round t is the run's t-th exchange; its key is the digest of the global state it starts
from (the state at outer step t, or t − P with overlapped outer steps: swarm_members.py).
A peer that reaches round t looks at the membership records. The *leader* of round t is
the smallest peer id among the live peers in round t with the same key, that are not
`pending` (joined mid-round) and did not fail this peer earlier in the round. Everyone
else sends `join(t, key)` to the leader,
which holds the call open. The leader waits until every such regular peer has joined
(it pings those that have not, every second, and drops the ones that do not answer), or
until `comm.timeout` has passed; then it sorts the members by peer id, picks a random
group id and answers every held join with `begin(group id, members)`. Pending peers join
if they arrive in time; nobody waits for them.

Views differ for a moment (records propagate through the DHT), so a join can reach a
peer that is not leading: it answers `redirect` (it follows another leader), `ahead`
(it has finished round t: the caller is behind and downloads the newer state), `behind`
(the caller skips it), `late` (the group has closed) or holds the call until it enters
round t itself. A leader that sees a smaller regular peer step down and redirects its
followers. If two groups ever form for one round, their states differ; the digest
majority (swarm_members.View) then makes the minority download the majority's state.

What happens inside a group (the exchange, all or nothing) is swarm_exchange.py; the
results of past rounds, which a peer that missed a round applies, are swarm_results.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from dilo.comm.swarm_auth import AuthError
from dilo.comm.swarm_exchange import PING_EVERY_S, PING_TIMEOUT_S, Exchange, Mailboxes, Position, Pulse
from dilo.comm.swarm_members import Membership, View
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")


def agree_offers(offers: list[dict | None]) -> list | None:
    """data.watch: the [name, size] files every member offered, past the newest `last` of
    the offers, in name order (dilo/data_stream.py's agreement rule); None if no offer."""
    if any(o is None for o in offers):
        return None
    last = max(str(o["last"]) for o in offers)
    common = set.intersection(*({(str(n), int(size)) for n, size in o["files"]} for o in offers))
    return [[n, size] for n, size in sorted(common) if n > last]


@dataclass
class Outcome:
    kind: str
    """"group" (exchange with `group`), "alone", "behind" (others are ahead), "resync" (this
    peer's state is not the majority's)."""
    group: Exchange | None = None
    ahead: int = 0
    """"behind": the latest round another peer was seen in."""


@dataclass
class _Lead:
    t: int
    key: str
    joined: dict[str, dict] = field(default_factory=dict)
    changed: Pulse = field(default_factory=Pulse)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, *outcome) -> None:
        if not self.result.done():
            self.result.set_result(outcome)


class Rounds:
    """Group formation for this peer: leader election, the `join` RPC, and this peer's groups
    (runs on the node's loop)."""

    def __init__(self, node: SwarmNode, members: Membership, timeout: float):
        self.node = node
        self.members = members
        self.timeout = timeout
        self.position = Position()
        self.mailboxes = Mailboxes(node, self.position, timeout)
        self.lead: _Lead | None = None
        self.last_group: set[str] = set()
        """The other peers of this peer's last completed round."""
        self.refused: set[str] = set()
        """Peers refused from the current round (their contributions were dropped repeatedly:
        swarm_exchange.Refusals); their joins are answered "refused"."""

    async def start(self) -> None:
        await self.node.serve("join", self._on_join)
        await self.mailboxes.start()

    @property
    def step(self) -> int:
        """Outer step of this peer's global state: the round it is computing or in."""
        return self.position.step

    def set_step(self, step: int) -> None:
        self.position.set_step(step)

    # -- forming the group ---------------------------------------------------------------
    def _leader(self, view: View, t: int, key: str, suspects: set[str]) -> tuple[str, set[str]]:
        """(leader of round t in this view, the peers a leader waits for).

        A leader waits for the regular peers in round t, and for the peers of its last
        round that are still behind (one that lost the end of that round is downloading
        its result right now and will be in round t in a moment).
        """
        # A peer still at the start gate (not training) whose gate is open (as many peers in
        # round t as its peers.min_peers) is about to start: the round waits for it. One whose
        # gate is still closed would hold everyone up; it joins a later round instead.
        here = [m for m in view.at_round(t) if m.key == key and m.peer not in suspects]
        peers = [m for m in here if m.training or m.min_peers <= len(here)]
        regular = [m for m in peers if not m.pending]
        pool = regular or peers or [view.members[self.node.name]]
        catching_up = {m.peer for m in view.members.values()
                       if m.peer in self.last_group and m.round < t and not m.pending and m.peer not in suspects}
        return min(m.peer for m in pool), {m.peer for m in regular} | catching_up

    def _newcomer_waits(self, view: View, t: int, suspects: set[str]) -> bool:
        """A pending peer (it joined mid-run and has not been in a round yet) that is first in
        round t does not run it alone while regular peers are on their way to it: it may be
        ahead of them only because it skipped the exchanges they ran (it fetched results)."""
        me = view.members.get(self.node.name)
        return me is not None and me.pending and any(
            m.training and not m.pending and m.round < t and m.peer not in suspects
            for m in view.members.values() if m.peer != self.node.name)

    async def form_group(self, t: int, key: str, suspects: set[str], offer: dict | None = None) -> Outcome:
        """`offer` (data.watch): the files this peer sees, sent with its join; the leader answers
        the ones every member offered (`agree_offers`) as the group's `note`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self.set_step(t)
        await self.members.update(round=t, key=key)  # (without overlap confirm() stored them already)
        hint = None
        try:
            while True:
                view = await self.members.view()
                if (newest := view.newest_round(self.node.name)) > t:
                    return Outcome("behind", ahead=newest)
                majority = view.majority_key(t)
                if majority is not None and majority != key:
                    return Outcome("resync")
                if loop.time() > deadline:
                    return Outcome("alone")
                leader, _ = self._leader(view, t, key, suspects)
                if hint is not None and hint not in suspects and hint in view.members:
                    leader, hint = hint, None
                if leader == self.node.name and self._newcomer_waits(view, t, suspects):
                    await self.position.changed.wait(0.3)
                    continue
                if leader == self.node.name:
                    outcome = await self._lead(t, key, suspects, deadline, view, offer)
                    if outcome is not None:
                        return outcome
                    continue
                self.position.following = leader
                self.position.changed.fire()
                try:
                    reply, _ = await self.node.call(
                        leader, "join", {"t": t, "key": key, "wait": max(0.0, deadline - loop.time()), "offer": offer},
                        timeout=max(1.0, deadline - loop.time()) + 5)
                except (PeerUnreachable, RemoteError) as e:
                    log.debug("round %d: leader %s failed: %s", t, leader[-8:], e)
                    suspects.add(leader)
                    continue
                finally:
                    self.position.following = None
                kind = reply.get("r")
                if kind == "begin":
                    group = self.mailboxes.register(bytes(reply["g"]), t, list(reply["peers"]), leader)
                    group.note = reply.get("note")
                    return Outcome("group", group)
                if kind == "ahead":
                    return Outcome("behind", ahead=int(reply.get("step", t + 1)))
                if kind == "redirect":
                    hint = str(reply["leader"])
                elif kind in ("behind", "mismatch", "refused"):
                    suspects.add(leader)
                else:  # late, or the leader is busy: the view will tell what happened
                    await asyncio.sleep(0.3)
        finally:
            self.position.changed.fire()

    async def _lead(self, t: int, key: str, suspects: set[str], deadline: float, view: View,
                    offer: dict | None = None) -> Outcome | None:
        loop = asyncio.get_running_loop()
        lead = self.lead = _Lead(t, key)
        self.position.changed.fire()
        last_ping = 0.0
        try:
            while True:
                if view is None:
                    view = await self.members.view()
                if (newest := view.newest_round(self.node.name)) > t:
                    lead.finish("ahead", newest)
                    return Outcome("behind", ahead=newest)
                leader, regular = self._leader(view, t, key, suspects)
                if leader != self.node.name:  # a smaller regular peer reached the round
                    lead.finish("redirect", leader)
                    return None
                missing = regular - set(lead.joined) - {self.node.name}
                waiting = not missing and not lead.joined and self._newcomer_waits(view, t, suspects)
                if (not missing and not waiting) or loop.time() > deadline:
                    break
                if missing and loop.time() - last_ping > PING_EVERY_S:
                    replies = await asyncio.gather(*(self._alive(p) for p in missing))
                    last_ping = loop.time()
                    suspects.update(p for p, ok in zip(missing, replies) if not ok)
                    view = None
                    continue
                await lead.changed.wait(0.5)
                view = None
            peers = sorted({self.node.name, *lead.joined})
            if len(peers) == 1:
                log.debug("round %d: alone; suspects %s, last group %s", t, [p[-8:] for p in suspects],
                          [p[-8:] for p in self.last_group])
                lead.finish("alone")
                return Outcome("alone")
            group = self.mailboxes.register(os.urandom(16), t, peers, self.node.name)
            group.note = agree_offers([offer, *(lead.joined[p].get("offer") for p in peers if p != self.node.name)])
            lead.finish("begin", group)
            return Outcome("group", group)
        finally:
            lead.finish("late")
            self.lead = None
            self.position.changed.fire()

    async def _alive(self, peer: str) -> bool:
        try:
            await self.node.call(peer, "ping", {}, timeout=PING_TIMEOUT_S)
            return True
        except (PeerUnreachable, RemoteError, AuthError):
            return False

    async def _on_join(self, remote, header: dict, _frames) -> tuple[dict, None]:
        loop = asyncio.get_running_loop()
        peer, t = remote.to_base58(), int(header["t"])
        until = loop.time() + min(float(header.get("wait", 0.0)), self.timeout)
        if peer in self.refused:
            return {"r": "refused"}, None
        while True:
            if self.step > t:
                return {"r": "ahead", "step": self.step}, None
            if self.step < t:
                return {"r": "behind", "step": self.step}, None
            lead = self.lead
            if lead is not None and lead.t == t and not lead.result.done():
                if header.get("key") != lead.key:
                    return {"r": "mismatch"}, None
                lead.joined[peer] = header
                lead.changed.fire()
                try:
                    outcome = await asyncio.wait_for(asyncio.shield(lead.result), max(0.0, until - loop.time()))
                except asyncio.TimeoutError:
                    lead.joined.pop(peer, None)
                    return {"r": "late"}, None
                if outcome[0] == "begin" and peer in outcome[1].peers:
                    return {"r": "begin", "g": outcome[1].group_id, "peers": outcome[1].peers,
                            "note": outcome[1].note}, None
                if outcome[0] == "redirect":
                    return {"r": "redirect", "leader": outcome[1]}, None
                if outcome[0] == "ahead":
                    return {"r": "ahead", "step": outcome[1]}, None
                return {"r": "late"}, None
            if self.position.following is not None:
                return {"r": "redirect", "leader": self.position.following}, None
            if self.mailboxes.active_in(t):
                return {"r": "late"}, None
            if loop.time() > until:
                return {"r": "late"}, None
            await self.position.changed.wait(min(1.0, until - loop.time()))  # not in round t yet

    # -- this peer's groups ----------------------------------------------------------------
    async def close_group(self, group: Exchange, status: str) -> None:
        self.mailboxes.close(group, status)
        if status == "done":
            self.last_group = set(group.peers) - {self.node.name}
            self.set_step(group.t + 1)
