"""Results of past rounds: what a peer that missed a round applies instead of running it.

With overlapped outer steps a round is applied P rounds after it ran, so a peer that
missed one (it was behind, or it joined while the round was in flight) can still apply
it on schedule: it asks `result(t)` of the peers that went past round t, and gets the
averaged vector that they will apply (sha256-checked). Each peer keeps the results of
its last 2P + 2 rounds for this (`RoundResults.keep`; none without overlap, where a peer
that misses a round downloads the newer state instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict

import torch

from dilo.comm.swarm_exchange import Position
from dilo.comm.swarm_members import Membership
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")


class RoundResults:
    """This peer's cache of past rounds' results, the `result` RPC that serves it, and the
    fetch of a missed round's result from the others (runs on the node's loop)."""

    def __init__(self, node: SwarmNode, members: Membership, position: Position):
        self.node, self.members, self.position = node, members, position
        self.keep = 0
        """How many past rounds' results this peer keeps for others (see the module docstring)."""
        self.held: OrderedDict[int, tuple[str, torch.Tensor, int]] = OrderedDict()
        """round -> (key, averaged vector, peers that ran it)."""
        self.bad_results: list[str] = []
        """Results of past rounds refused since the owner last looked (wrong size or checksum)."""

    async def start(self) -> None:
        await self.node.serve("result", self._on_result)

    async def finished_round(self, t: int, key: str, average: torch.Tensor, num_peers: int) -> None:
        """This peer holds round t's result (it ran the round, alone or not, or fetched it)."""
        if self.position.step <= t:
            self.position.set_step(t + 1)
        if self.keep:
            self.held[t] = (key, average, num_peers)
            while len(self.held) > self.keep:
                self.held.popitem(last=False)

    async def _on_result(self, remote, header: dict, _frames) -> tuple[dict, list]:
        t = int(header["t"])
        found = self.held.get(t)
        if found is None:
            return {"none": True, "gone": self.position.step > t}, []
        key, average, num_peers = found
        data = average.contiguous().numpy()
        return {"key": key, "numel": average.numel(), "peers": num_peers,
                "sha256": hashlib.sha256(data.tobytes()).hexdigest()}, [data]

    async def fetch(self, t: int, key: str | None, timeout: float) -> tuple[torch.Tensor, int, int] | None:
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
