"""One group's exchange, all or nothing, and the mailboxes it runs over.

Members run `two_phase_average` (protocol.py) over two collectives built from `put`
messages into per-group mailboxes. A member applies the round only if it received every
slice of both phases. It stops at once when a send fails, when a member it still needs
data from has aborted or does not answer a ping, or after `comm.timeout`; it then tells
the others (`abort`) and the round is retried with the live peers. A member that
completed the round while another aborted is simply ahead: the other downloads its
state. So no member ever applies a partially averaged round. A slice of the wrong size
is replaced by an encoded all-NaN slice, which the owner drops like any non-finite
contribution (and the drop is logged and counted).

Who is in a group is decided by swarm_round.py (group formation); this module only runs
the group it is given. Everything here runs on the node's event loop, except
`average_in_group`, which the training thread calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import numpy as np
import torch

from dilo.aggregate import MEAN, Aggregate
from dilo.codecs import Codec
from dilo.comm.protocol import ExchangeResult, RoundReport, chunk_numel
from dilo.comm.two_phase import two_phase_average
from dilo.comm.swarm_auth import AuthError
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")

PING_EVERY_S = 1.0
PING_TIMEOUT_S = 3.0


class ExchangeFailed(Exception):
    """The round cannot complete on this member; `peers` are the ones that failed it."""

    def __init__(self, message: str, peers: set[str]):
        super().__init__(message)
        self.peers = peers


class Pulse:
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


class Position:
    """Where this peer stands in the rounds: moved by group formation (swarm_round.py), read by
    the mailboxes and the results cache (swarm_results.py). Touched on the node's loop only."""

    def __init__(self):
        self.step = 0
        """Outer step of this peer's global state: the round it is computing or in."""
        self.following: str | None = None
        """The leader this peer's join is waiting on, if any."""
        self.changed = Pulse()
        """Fired when the step, the leader followed or this peer's groups change."""

    def set_step(self, step: int) -> None:
        self.step = step
        self.changed.fire()


class Exchange:
    """One group's exchange: members in a fixed order and a mailbox per phase."""

    def __init__(self, node: SwarmNode, group_id: bytes, t: int, peers: list[str], leader: str = ""):
        self.node, self.group_id, self.t, self.peers, self.leader = node, group_id, t, peers, leader
        self.rank = peers.index(node.name)
        self.size = len(peers)
        self.inbox: dict[int, dict[int, bytes]] = {1: {}, 2: {}}
        self.arrived = Pulse()
        self.aborted_by: set[int] = set()
        self.status = "active"
        self.bad_slices: list[str] = []
        self.note: list | None = None
        """data.watch: the files the round's leader found in every member's offer (swarm_round.py)."""

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

    async def deliver(self, phase: int, header: dict, outgoing: list, deadline: float) -> dict[int, asyncio.Task]:
        """Start sending outgoing[j] to every other member j: {j: its send task}.
        (tools/swarm_fault_peer.py wraps this method to crash mid-delivery.)"""
        return {j: asyncio.create_task(self._send(j, header, outgoing[j], deadline))
                for j in range(self.size) if j != self.rank}

    async def collective(self, phase: int, outgoing: list, nbytes: int, poison: bytes,
                         timeout: float) -> list[bytes]:
        """Send outgoing[j] to member j, return what every member sent this one (own slot: outgoing[rank])."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        header = {"g": self.group_id, "phase": phase, "src": self.rank, "leader": self.leader}
        sends = await self.deliver(phase, header, outgoing, deadline)
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


class Mailboxes:
    """This peer's groups and the exchange's messages: `put` (a slice into a group's mailbox),
    `ping` (is this peer alive, and how does it see a group) and `abort`."""

    def __init__(self, node: SwarmNode, position: Position, timeout: float):
        self.node, self.position, self.timeout = node, position, timeout
        self.groups: dict[bytes, Exchange] = {}
        self.finished: dict[bytes, str] = {}
        """group id -> how it ended ("done", "aborted"), for the last 64 groups."""

    async def start(self) -> None:
        for method, handler in (("put", self._on_put), ("ping", self._on_ping), ("abort", self._on_abort)):
            await self.node.serve(method, handler)

    def register(self, group_id: bytes, t: int, peers: list[str], leader: str = "") -> Exchange:
        group = Exchange(self.node, group_id, t, peers, leader)
        self.groups[group_id] = group
        self.position.changed.fire()
        return group

    def active_in(self, t: int) -> bool:
        return any(g.t == t and g.status == "active" for g in self.groups.values())

    def close(self, group: Exchange, status: str) -> None:
        """Forget the group; an aborted one is announced to its other members."""
        group.status = status
        self.groups.pop(group.group_id, None)
        self.finished[group.group_id] = status
        while len(self.finished) > 64:
            self.finished.pop(next(iter(self.finished)))
        if status != "done":
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
               and self.position.following == leader):
            await self.position.changed.wait(min(1.0, until - loop.time()))
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
        reply = {"step": self.position.step}
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


def average_in_group(node: SwarmNode, group: Exchange, flat: torch.Tensor, codec: Codec, timeout: float,
                     on_bad_slice: Callable[[str], None], aggregate: Aggregate = MEAN,
                     report: RoundReport | None = None, owner_error: bool = False) -> ExchangeResult:
    """The two-phase average among `group` (training thread; the collectives run on the loop).
    Raises ExchangeFailed when the round cannot complete here: nothing is applied then.
    With `report`, phase-1 slices carry it (24 bytes more; a bad slice's report reads NaN tokens).
    `owner_error` (`two_phase_average`): compute the owner error (comm.owner_feedback asks)."""
    chunk = chunk_numel(flat.numel(), group.size, codec.block_size)
    nbytes = codec.encoded_nbytes(chunk)
    poison = codec.encode(torch.full((chunk,), float("nan"))).numpy().tobytes()
    extra = RoundReport.NBYTES if report is not None else 0
    no_report = np.full(3, np.nan).tobytes()  # (owners drop the NaN-token member: dilo/aggregate.py)

    def collective(phase: int, slices: list) -> torch.Tensor:
        size, bad = (nbytes + extra, poison + no_report[:extra]) if phase == 1 else (nbytes, poison)
        got = node.run(group.collective(phase, slices, size, bad, timeout), timeout=timeout + 30)
        for problem in group.bad_slices:
            on_bad_slice(problem)
        group.bad_slices.clear()
        return torch.frombuffer(bytearray(b"".join(got)), dtype=torch.uint8)

    def all_to_all(buf: torch.Tensor) -> torch.Tensor:
        return collective(1, [to_bytes_view(s) for s in buf.view(group.size, -1)])

    def all_gather(buf: torch.Tensor) -> torch.Tensor:
        return collective(2, [to_bytes_view(buf)] * group.size)

    return two_phase_average(flat, codec, group.rank, group.size, all_to_all, all_gather, aggregate=aggregate,
                             report=report, owner_error=owner_error)


class Refusals:
    """Peers whose contributions this peer dropped as a chunk's owner (non-finite, saturated:
    dilo/aggregate.py) in `after` rounds in a row are refused from the next `rounds` rounds:
    not waited for, never followed, and answered "refused" when they join a round this peer
    leads (dilo/comm/swarm_round.py). A refused peer ends up alone and resyncs from the majority."""

    def __init__(self, after: int = 3, rounds: int = 10):
        self.after, self.rounds = after, rounds
        self.streak: dict[str, int] = {}
        self.until: dict[str, int] = {}
        """peer -> first round it may take part in again."""

    def record(self, t: int, peers: list[str], dropped: set[str], me: str) -> list[str]:
        """Round t ran with `peers`, this peer dropped the contributions of `dropped`: the newly refused."""
        refused = []
        for peer in peers:
            if peer == me:
                continue
            self.streak[peer] = self.streak.get(peer, 0) + 1 if peer in dropped else 0
            if self.streak[peer] >= self.after:
                self.until[peer], self.streak[peer] = t + 1 + self.rounds, 0
                refused.append(peer)
        return refused

    def refused(self, t: int) -> set[str]:
        return {peer for peer, until in self.until.items() if t < until}


def to_bytes_view(buf) -> memoryview:
    return memoryview(np.ascontiguousarray(buf.numpy())).cast("B")
