"""Admission: a peer says hello to `peers.initial`, and both sides compare run settings.

The run key is checked by the node on every call (swarm_node.py, swarm_auth.py); `hello`
adds the settings that must match for two peers to train one model (model, outer
optimizer, codec, mode: `Config.shared_settings`, and run.steps). A mismatch is refused on both
sides, each naming the settings that differ. The answer also tells the newcomer whether
the swarm is already training, so that it joins that run instead of starting a new one.
"""

from __future__ import annotations

import logging
from typing import Callable

from dilo.comm.swarm_auth import AuthError, settings_mismatch
from dilo.comm.swarm_members import Membership
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")


class Admission:
    """This peer's side of `hello`, both as the one who asks and the one who answers."""

    def __init__(self, node: SwarmNode, members: Membership, settings: dict,
                 refused: Callable[[str, str, str], None]):
        self.node, self.members, self.settings, self.refused = node, members, settings, refused

    async def start(self) -> None:
        await self.node.serve("hello", self._on_hello)

    async def _on_hello(self, remote, header: dict, _frames):
        theirs = header.get("settings", {})
        if settings_mismatch(self.settings, theirs):
            self.refused(remote.to_base58(), "settings", "its run settings differ: " +
                         settings_mismatch(self.settings, theirs, "this peer", "that peer"))
            raise AuthError(f"refused by {self.node.name}: run settings differ from the swarm's: " +
                            settings_mismatch(theirs, self.settings, "this peer", "the swarm"))
        me = self.members.me
        return {"name": self.node.name, "training": me["training"], "step": me["step"]}, None

    def hello(self, initial: list[str]) -> int:
        """Say hello to every address of `peers.initial` (training thread). Returns the outer
        step the swarm was training at (0: none of them was training yet). A refusal raises
        ValueError; so does an `initial` of which no peer answered."""
        answered, running_at = [], 0
        for addr in initial:
            peer = addr.rsplit("/p2p/", 1)[-1].split("/")[0]
            try:
                reply, _ = self.node.run(self.node.call(peer, "hello", {"settings": self.settings}, timeout=30),
                                         timeout=40)
                answered.append(addr)
                if reply.get("training") and int(reply.get("step", 0)) > 0:
                    running_at = max(running_at, int(reply["step"]))
            except AuthError as e:
                raise ValueError(f"peers.initial {addr}: {e}") from None
            except (PeerUnreachable, RemoteError) as e:
                log.warning("peers.initial %s did not answer: %s", addr, e)
        if not answered:
            raise ValueError(f"none of peers.initial answered: {', '.join(initial)}")
        return running_at
