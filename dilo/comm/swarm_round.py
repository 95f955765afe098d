"""One round of the swarm: which peers average together, and the two byte collectives.

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

Results of past rounds
----------------------
With overlapped outer steps a round is applied P rounds after it ran, so a peer that
missed one (it was behind, or it joined while the round was in flight) can still apply
it on schedule: it asks `result(t)` of the peers that went past round t, and gets the
averaged vector that they will apply (sha256-checked). Each peer keeps the results of
its last few rounds for this (`Rounds.keep`; none without overlap, where a peer that
misses a round downloads the newer state instead).

The exchange: all or nothing
----------------------------
Members run `two_phase_average` (protocol.py) over two collectives built from `put`
messages into per-group mailboxes. A member applies the round only if it received every
slice of both phases. It stops at once when a send fails, when a member it still needs
data from has aborted or does not answer a ping, or after `comm.timeout`; it then tells
the others (`abort`) and the round is retried with the live peers. A member that
completed the round while another aborted is simply ahead: the other downloads its
state. So no member ever applies a partially averaged round. A slice of the wrong size
is replaced by an encoded all-NaN slice, which the owner drops like any non-finite
contribution (and the drop is logged and counted).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from dilo.comm.swarm_auth import AuthError
from dilo.comm.swarm_members import Membership, View
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")

PING_EVERY_S = 1.0
PING_TIMEOUT_S = 3.0
# Fault injection for the tests: "<round>:<phase>" makes this process SIGKILL itself in that
# round's phase after delivering its slice of that phase to one member only (a crash mid-exchange).
_KILL_AT = os.environ.get("DILO_FAULT_KILL_AT", "")


class ExchangeFailed(Exception):
    """The round cannot complete on this member; `peers` are the ones that failed it."""

    def __init__(self, message: str, peers: set[str]):
        super().__init__(message)
        self.peers = peers


@dataclass
class Outcome:
    kind: str
    """"group" (exchange with `group`), "alone", "behind" (others are ahead), "resync" (this
    peer's state is not the majority's)."""
    group: Exchange | None = None
    ahead: int = 0
    """"behind": the latest round another peer was seen in."""


class _Pulse:
    """An event that wakes every current waiter each time it is fired."""

    def __init__(self):
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass


@dataclass
class _Lead:
    t: int
    key: str
    joined: dict[str, dict] = field(default_factory=dict)
    changed: _Pulse = field(default_factory=_Pulse)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, *outcome) -> None:
        if not self.result.done():
            self.result.set_result(outcome)


class Exchange:
    """One group's exchange: members in a fixed order and a mailbox per phase."""

    def __init__(self, node: SwarmNode, group_id: bytes, t: int, peers: list[str], leader: str = ""):
        self.node, self.group_id, self.t, self.peers, self.leader = node, group_id, t, peers, leader
        self.rank = peers.index(node.name)
        self.size = len(peers)
        self.inbox: dict[int, dict[int, bytes]] = {1: {}, 2: {}}
        self.arrived = _Pulse()
        self.aborted_by: set[int] = set()
        self.status = "active"
        self.bad_slices: list[str] = []

    async def _send(self, j: int, header: dict, payload, deadline: float) -> tuple[dict, list]:
        """One slice to member j. A stream that breaks without an answer is retried (the put is
        idempotent); a refused connection fails on the last try, a silent peer at the deadline."""
        loop = asyncio.get_running_loop()
        for attempt in range(3):
            try:
                return await self.node.call(self.peers[j], "put", header, payload,
                                            timeout=max(1.0, deadline - loop.time()))
            except PeerUnreachable as e:
                if attempt == 2 or loop.time() >= deadline or "did not answer" in str(e):
                    raise
                log.debug("round %d: retrying a put to %s: %s", self.t, self.peers[j][-8:], e)
                await asyncio.sleep(0.05 * (attempt + 1))

    async def _ping(self, rank: int) -> str | None:
        try:
            reply, _ = await self.node.call(self.peers[rank], "ping", {"g": self.group_id}, timeout=PING_TIMEOUT_S)
            return str(reply.get("g"))
        except (PeerUnreachable, RemoteError, AuthError):
            return None

    async def collective(self, phase: int, outgoing: list, nbytes: int, poison: bytes,
                         timeout: float) -> list[bytes]:
        """Send outgoing[j] to member j, return what every member sent this one (own slot: outgoing[rank])."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        header = {"g": self.group_id, "phase": phase, "src": self.rank, "leader": self.leader}
        sends = {j: asyncio.create_task(self._send(j, header, outgoing[j], deadline))
                 for j in range(self.size) if j != self.rank}
        if _KILL_AT == f"{self.t}:{phase}" and sends:  # deliver to exactly one member, then crash
            first = min(sends)
            for j, task in sends.items():
                if j != first:
                    task.cancel()
            await asyncio.wait([sends[first]])
            os.kill(os.getpid(), signal.SIGKILL)
        last_ping = loop.time()
        while True:
            missing = [i for i in range(self.size) if i != self.rank and i not in self.inbox[phase]]
            failed = {j for j, task in sends.items() if task.done() and not _delivered(task)}
            if failed and phase == 1:  # the owner lacks our slice: it cannot finish its chunk
                raise ExchangeFailed(f"phase 1: could not deliver to {_why(self, sends, failed)}",
                                     {self.peers[j] for j in failed})
            if not missing:
                break
            if self.aborted_by.intersection(missing):
                gone = self.aborted_by.intersection(missing)
                raise ExchangeFailed(f"phase {phase}: {_names(self, gone)} aborted the round",
                                     {self.peers[j] for j in gone})
            if loop.time() > deadline:
                raise ExchangeFailed(f"phase {phase}: no data from {_names(self, missing)} within {timeout:.0f} s",
                                     {self.peers[j] for j in missing})
            if loop.time() - last_ping > PING_EVERY_S:
                statuses = await asyncio.gather(*(self._ping(i) for i in missing))
                last_ping = loop.time()
                # "unknown": it has not registered the group (the leader's begin may be late)
                dead = {i for i, s in zip(missing, statuses)
                        if s is None or s == "aborted" or (s == "unknown" and loop.time() - start > timeout / 2)}
                if dead:
                    raise ExchangeFailed(f"phase {phase}: {_names(self, dead)} died or left the round",
                                         {self.peers[j] for j in dead})
                continue
            await self.arrived.wait(0.25)
        if phase == 1:
            done, _ = await asyncio.wait(sends.values(), timeout=max(0.0, deadline - loop.time()))
            failed = {j for j, task in sends.items() if task not in done or not _delivered(task)}
            if failed:
                raise ExchangeFailed(f"phase 1: could not deliver to {_why(self, sends, failed)}",
                                     {self.peers[j] for j in failed})
        else:  # we hold every chunk; a receiver that fails now only hurts itself
            for task in sends.values():
                task.add_done_callback(_quiet)
        out = []
        for i in range(self.size):
            if i == self.rank:
                out.append(bytes(outgoing[i]))
                continue
            data = self.inbox[phase][i]
            if len(data) != nbytes:
                self.bad_slices.append(f"{self.peers[i]} sent {len(data)} bytes in phase {phase}, expected {nbytes}")
                data = poison
            out.append(data)
        return out


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("swarm: late send failed: %s", task.exception())


def _delivered(task: asyncio.Task) -> bool:
    if task.cancelled() or task.exception() is not None:
        return False
    reply = task.result()[0]
    return bool(reply.get("ok")) or reply.get("why") == "done"  # done: it had all it needed


def _why(ex: Exchange, sends: dict, ranks) -> str:
    reasons = []
    for j in sorted(ranks):
        task = sends[j]
        if not task.done():
            why = "no answer in time"
        elif task.cancelled() or task.exception() is not None:
            why = str(task.exception()) if not task.cancelled() else "cancelled"
        else:
            why = str(task.result()[0].get("why", "refused"))
        reasons.append(f"{ex.peers[j][-8:]} ({why})")
    return ", ".join(reasons)


def _names(ex: Exchange, ranks) -> str:
    return ", ".join(ex.peers[r][-8:] for r in sorted(ranks))


class Rounds:
    """Group formation and the exchange mailboxes of this peer (runs on the node's loop)."""

    def __init__(self, node: SwarmNode, members: Membership, timeout: float):
        self.node = node
        self.members = members
        self.timeout = timeout
        self.step = 0
        """Outer step of this peer's global state: the round it is computing or in."""
        self.entered = False
        self.lead: _Lead | None = None
        self.following: str | None = None
        self.changed = _Pulse()
        self.groups: dict[bytes, Exchange] = {}
        self.finished: dict[bytes, str] = {}
        self.last_group: set[str] = set()
        """The other peers of this peer's last completed round."""
        self.keep = 0
        """How many past rounds' results this peer keeps for others (see the module docstring)."""
        self.results: OrderedDict[int, tuple[str, torch.Tensor, int]] = OrderedDict()
        """round -> (key, averaged vector, peers that ran it)."""
        self.bad_results: list[str] = []
        """Results of past rounds refused since the owner last looked (wrong size or checksum)."""

    async def start(self) -> None:
        for method, handler in (("join", self._on_join), ("put", self._on_put), ("ping", self._on_ping),
                                ("abort", self._on_abort), ("result", self._on_result)):
            await self.node.serve(method, handler)

    def set_step(self, step: int) -> None:
        self.step = step
        self.changed.fire()

    # -- results of past rounds ----------------------------------------------------------
    def finished_round(self, t: int, key: str, average: torch.Tensor, num_peers: int) -> None:
        """This peer holds round t's result (it ran the round, alone or not, or fetched it)."""
        if self.step <= t:
            self.set_step(t + 1)
        if self.keep:
            self.results[t] = (key, average, num_peers)
            while len(self.results) > self.keep:
                self.results.popitem(last=False)

    async def _on_result(self, remote, header: dict, _frames) -> tuple[dict, list]:
        t = int(header["t"])
        found = self.results.get(t)
        if found is None:
            return {"none": True, "gone": self.step > t}, []
        key, average, num_peers = found
        data = average.contiguous().numpy()
        return {"key": key, "numel": average.numel(), "peers": num_peers,
                "sha256": hashlib.sha256(data.tobytes()).hexdigest()}, [data]

    async def fetch_result(self, t: int, key: str | None, timeout: float) -> tuple[torch.Tensor, int, int] | None:
        """Round t's result from a peer that went past it: (average, its peers, bytes), or None
        when every such peer answers that it no longer holds it, or after `timeout`.
        With `key`, only a result of a round that started from that state is taken."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            view = await self.members.view()
            # Peers whose record is at round t may have finished it and not entered the next yet.
            ahead = sorted((m for m in view.members.values() if m.round >= t and m.peer != self.node.name),
                           key=lambda m: (m.pending, m.peer))
            gone = 0  # peers that went past round t and cannot give this peer its result
            for m in ahead:
                try:
                    reply, frames = await self.node.call(m.peer, "result", {"t": t},
                                                         timeout=max(1.0, deadline - loop.time()))
                    if reply.get("none"):
                        gone += bool(reply.get("gone"))
                        continue
                    if key is not None and reply["key"] != key:
                        gone += 1  # that peer's round started from another state
                        continue
                    numel = int(reply["numel"])
                    if len(frames) != 1 or len(frames[0]) != 4 * numel:
                        problem = f"{[len(f) for f in frames]} bytes for {numel} values"
                    elif hashlib.sha256(frames[0]).hexdigest() != reply["sha256"]:
                        problem = "bytes that do not match its checksum"
                    else:
                        problem = ""
                except (PeerUnreachable, RemoteError, KeyError, TypeError, ValueError) as e:
                    log.debug("round %d: result from %s failed: %s", t, m.peer[-8:], e)
                    continue
                if problem:
                    self.bad_results.append(f"round {t}: {m.peer[-8:]} sent a result of {problem}")
                    continue
                average = torch.frombuffer(bytearray(frames[0]), dtype=torch.float32)
                return average, int(reply["peers"]), len(frames[0])
            if ahead and gone == len(ahead):
                return None
            await asyncio.sleep(0.5)
        return None

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

    async def form_group(self, t: int, key: str, suspects: set[str]) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self.set_step(t)
        self.entered = True
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
                    await self.changed.wait(0.3)
                    continue
                if leader == self.node.name:
                    outcome = await self._lead(t, key, suspects, deadline, view)
                    if outcome is not None:
                        return outcome
                    continue
                self.following = leader
                self.changed.fire()
                try:
                    reply, _ = await self.node.call(
                        leader, "join", {"t": t, "key": key, "wait": max(0.0, deadline - loop.time())},
                        timeout=max(1.0, deadline - loop.time()) + 5)
                except (PeerUnreachable, RemoteError) as e:
                    log.debug("round %d: leader %s failed: %s", t, leader[-8:], e)
                    suspects.add(leader)
                    continue
                finally:
                    self.following = None
                kind = reply.get("r")
                if kind == "begin":
                    return Outcome("group", self._register(bytes(reply["g"]), t, list(reply["peers"]), leader))
                if kind == "ahead":
                    return Outcome("behind", ahead=int(reply.get("step", t + 1)))
                if kind == "redirect":
                    hint = str(reply["leader"])
                elif kind in ("behind", "mismatch"):
                    suspects.add(leader)
                else:  # late, or the leader is busy: the view will tell what happened
                    await asyncio.sleep(0.3)
        finally:
            self.entered = False
            self.changed.fire()

    async def _lead(self, t: int, key: str, suspects: set[str], deadline: float, view: View) -> Outcome | None:
        loop = asyncio.get_running_loop()
        lead = self.lead = _Lead(t, key)
        self.changed.fire()
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
            group = self._register(os.urandom(16), t, peers, self.node.name)
            lead.finish("begin", group)
            return Outcome("group", group)
        finally:
            lead.finish("late")
            self.lead = None
            self.changed.fire()

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
                    return {"r": "begin", "g": outcome[1].group_id, "peers": outcome[1].peers}, None
                if outcome[0] == "redirect":
                    return {"r": "redirect", "leader": outcome[1]}, None
                if outcome[0] == "ahead":
                    return {"r": "ahead", "step": outcome[1]}, None
                return {"r": "late"}, None
            if self.following is not None:
                return {"r": "redirect", "leader": self.following}, None
            if any(g.t == t and g.status == "active" for g in self.groups.values()):
                return {"r": "late"}, None
            if loop.time() > until:
                return {"r": "late"}, None
            await self.changed.wait(min(1.0, until - loop.time()))  # not in round t yet

    # -- the exchange's messages ---------------------------------------------------------
    def _register(self, group_id: bytes, t: int, peers: list[str], leader: str = "") -> Exchange:
        group = Exchange(self.node, group_id, t, peers, leader)
        self.groups[group_id] = group
        self.changed.fire()
        return group

    def close_group(self, group: Exchange, status: str) -> None:
        group.status = status
        self.groups.pop(group.group_id, None)
        self.finished[group.group_id] = status
        while len(self.finished) > 64:
            self.finished.pop(next(iter(self.finished)))
        if status == "done":
            self.last_group = set(group.peers) - {self.node.name}
            self.set_step(group.t + 1)
        else:
            for peer in group.peers:
                if peer != self.node.name:
                    asyncio.create_task(self._tell_abort(peer, group.group_id))

    async def _tell_abort(self, peer: str, group_id: bytes) -> None:
        try:
            await self.node.call(peer, "abort", {"g": group_id}, timeout=PING_TIMEOUT_S)
        except (PeerUnreachable, RemoteError, AuthError):
            pass

    async def _group(self, group_id: bytes, leader: str) -> Exchange | None:
        loop = asyncio.get_running_loop()
        # While this peer waits for that group's leader, the leader's begin may still be on
        # its way (or this peer starved of CPU): hold the message for up to half the exchange
        # timeout. A peer that is not waiting for that leader was left out (its join broke):
        # it answers at once, so the group does not wait for it.
        until = loop.time() + self.timeout / 2
        while (group_id not in self.groups and group_id not in self.finished and loop.time() < until
               and self.following == leader):
            await self.changed.wait(min(1.0, until - loop.time()))
        return self.groups.get(group_id)

    async def _on_put(self, remote, header: dict, frames: list) -> tuple[dict, None]:
        group = await self._group(bytes(header["g"]), str(header.get("leader", "")))
        if group is None:
            return {"ok": False, "why": self.finished.get(bytes(header["g"]), "unknown group")}, None
        src, phase = int(header["src"]), int(header["phase"])
        if not 0 <= src < group.size or group.peers[src] != remote.to_base58() or phase not in (1, 2):
            raise AuthError(f"refused: {remote.to_base58()} is not member {src} of this group")
        group.inbox[phase][src] = frames[0] if len(frames) == 1 else b""
        group.arrived.fire()
        return {"ok": True}, None

    async def _on_ping(self, remote, header: dict, _frames) -> tuple[dict, None]:
        reply = {"step": self.step}
        if "g" in header:
            group_id = bytes(header["g"])
            group = self.groups.get(group_id)
            reply["g"] = group.status if group else self.finished.get(group_id, "unknown")
        return reply, None

    async def _on_abort(self, remote, header: dict, _frames) -> tuple[dict, None]:
        group = self.groups.get(bytes(header["g"]))
        if group is not None and remote.to_base58() in group.peers:
            group.aborted_by.add(group.peers.index(remote.to_base58()))
            group.arrived.fire()
        return {}, None


def to_bytes_view(buf) -> memoryview:
    return memoryview(np.ascontiguousarray(buf.numpy())).cast("B")
