"""The global state for peers that join or fall behind: serve snapshots, download and verify.

A donor answers `state` with a consistent copy of its global state (taken under the
algorithm's lock, off the event loop): one raw frame per tensor, and a header naming the
outer step, the digest, each tensor's size and how many exchanges the donor had started
but not applied (with overlapped outer steps the receiver fetches those rounds' results
next: swarm_results.py). The receiver accepts it only if

1. the bytes hash to the digest in the header (nothing was lost or altered), and
2. that digest is the majority's for that step in a fresh membership view (the donor is
   not a lone diverged peer, and not lying about what the swarm agreed on).

Otherwise it tries the next donor: members holding the majority state of the newest
step, non-pending first. A donor that dies mid-transfer is one failed call. `catch_up`
is the loop around it for a peer that fell behind or holds a minority state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

import torch

from dilo.comm.protocol import GlobalState, SharedState
from dilo.comm.swarm_auth import AuthError, settings_mismatch
from dilo.comm.swarm_members import Membership
from dilo.comm.swarm_node import PeerUnreachable, RemoteError, SwarmNode

log = logging.getLogger("dilo")


class StateTransfer:
    def __init__(self, node: SwarmNode, members: Membership, settings: dict, timeout: float):
        self.node = node
        self.members = members
        self.settings = settings
        self.timeout = timeout
        self.holder: SharedState | None = None
        self.known_digest: tuple[int, str] | None = None
        """(outer step, digest) of the holder's state when the group knows it (set after every
        confirmed round): saves hashing a large state for each download. The receiver checks
        the bytes against the digest anyway, so a stale entry costs a retry, never a bad state."""
        self.last_download: dict | None = None
        """{"bytes", "seconds", "donor", "step", "digest", "data"} of the last successful download."""
        self.data_at: Callable[[int], dict | None] | None = None
        """data.watch (dilo/data_stream.py): the consumed-data manifest at an outer step, served
        with that step's state and required from a donor."""
        self.base: str | None = None
        """LoRA (docs/adapters.md): the digest of this peer's frozen base; a donor refuses a
        downloader whose base differs (θ holds the adapters only)."""

    async def start(self) -> None:
        await self.node.serve("state", self._on_state)

    async def _on_state(self, remote, header: dict, _frames) -> tuple[dict, list]:
        theirs = header.get("settings", {})
        if settings_mismatch(self.settings, theirs):
            self.node.on_refused(remote.to_base58(), "settings")
            raise AuthError("refused: run settings differ from the swarm's: " +
                            settings_mismatch(theirs, self.settings, "this peer", "the swarm"))
        if self.base and header.get("base") and header["base"] != self.base:
            self.node.on_refused(remote.to_base58(), "lora_base")
            raise AuthError(f"refused: this peer's LoRA base (digest {str(header['base'])[:12]}) is not the "
                            f"swarm's ({self.base[:12]}); start from the swarm's checkpoint.init_from")
        if self.holder is None:
            return {"none": True}, []
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, self.holder.export_state)
        names = list(state.tensors)
        tensors = [state.tensors[n].contiguous().view(-1) for n in names]
        known = self.known_digest
        if known is not None and known[0] == state.outer_step:
            digest = known[1]
        else:
            digest = await loop.run_in_executor(None, state.digest)
        meta = {"step": state.outer_step, "digest": digest, "names": names, "numel": [t.numel() for t in tensors],
                "in_flight": state.in_flight}
        if self.data_at is not None:
            meta["data"] = await loop.run_in_executor(None, self.data_at, state.outer_step)
        return meta, [t.numpy() for t in tensors]

    async def _download(self, donor: str) -> GlobalState:
        start = time.perf_counter()
        meta, frames = await self.node.call(donor, "state", {"settings": self.settings, "base": self.base},
                                            timeout=self.timeout)
        if meta.get("none"):
            raise RemoteError("donor has no state yet")
        if self.data_at is not None and not meta.get("data"):
            raise RemoteError(f"donor sent no data manifest for outer step {meta.get('step')}")
        numel = [int(n) for n in meta["numel"]]
        if len(frames) != len(numel) or any(len(f) != 4 * n for f, n in zip(frames, numel)):
            raise RemoteError(f"state frames of {[len(f) for f in frames]} bytes, header says "
                              f"{[4 * n for n in numel]}")
        tensors = {name: torch.frombuffer(f, dtype=torch.float32) if n else torch.empty(0)
                   for name, f, n in zip(meta["names"], frames, numel)}
        state = GlobalState(int(meta["step"]), tensors, int(meta.get("in_flight", 0)))
        digest = await asyncio.get_running_loop().run_in_executor(None, state.digest)
        if digest != meta["digest"]:
            raise RemoteError(f"state does not match its checksum (got {digest[:12]}, header {meta['digest'][:12]})")
        seconds = time.perf_counter() - start
        self.last_download = {"bytes": sum(len(f) for f in frames), "seconds": seconds, "donor": donor,
                              "step": state.outer_step, "digest": digest, "data": meta.get("data")}
        return state

    async def fetch(self, min_step: int) -> GlobalState | None:
        """The majority's state at the newest step >= min_step from the best live donor, or None."""
        view = await self.members.view()
        for donor in view.donors(min_step, exclude=self.node.name):
            try:
                state = await self._download(donor.peer)
            except AuthError:
                raise
            except (PeerUnreachable, RemoteError, KeyError, TypeError, ValueError) as e:
                log.warning("state download from %s failed (%s); trying the next donor", donor.peer[-8:], e)
                continue
            if await self._confirmed(state.outer_step, self.last_download["digest"]):
                info = self.last_download
                log.info("downloaded the global state of outer step %d from %s: %.1f MB in %.2f s (%.1f MB/s)",
                         state.outer_step, donor.peer[-8:], info["bytes"] / 1e6, info["seconds"],
                         info["bytes"] / 1e6 / max(info["seconds"], 1e-9))
                return state
            log.warning("state from %s (outer step %d) is not the swarm's majority state; trying the next donor",
                        donor.peer[-8:], state.outer_step)
        return None

    async def _confirmed(self, step: int, digest: str, attempts: int = 5) -> bool:
        """No other digest is more common than this one at its step among the other peers
        (their records may lag the donor by a moment, hence the retries)."""
        for _ in range(attempts):
            view = await self.members.view()
            counts = Counter(m.digest for m in view.at_step(step) if m.peer != self.node.name)
            if counts[digest] and counts[digest] == max(counts.values()):
                return True
            await asyncio.sleep(0.3)
        return False

    async def catch_up(self, t: int, kind: str, lag: int) -> GlobalState | None:
        """Download the swarm's newer state; a resync waits for the majority to finish round t.
        With overlap (round t is not outer step t) the newest majority state is taken: the
        rounds in flight there are fetched afterwards (DiLoCo.adopt_state)."""
        loop = asyncio.get_running_loop()
        if kind == "resync":  # this peer sits out round t: nobody should wait for it
            await self.members.update(pending=True)
        start = loop.time()
        while loop.time() - start < self.timeout:
            if lag:
                state = await self.fetch(0)
                if state is not None:
                    return state
                await asyncio.sleep(0.5)
                continue
            patient = kind == "resync" and loop.time() - start < self.timeout / 2
            state = await self.fetch(t + 1 if kind == "behind" or patient else t)
            if state is not None and (state.outer_step > t or kind == "resync"):
                return state
            await asyncio.sleep(0.5)
        return None
