"""A peer's start: join the running swarm, or found the run with the others at the start gate.

Peers that start a run together wait at the *start gate*: each publishes a regular record
at step 0 with the digest of its seeded θ (all equal), and they start once
`peers.min_peers` are there (or once any of them is training). A peer that arrives after
a round was finished joins mid-run instead: it downloads the majority's state and is
`pending` (the current round does not wait for it) until its first round. A peer whose
`peers.initial` was training when it said hello never starts a new run from step 0: it
waits for a donor of that run's state.
"""

from __future__ import annotations

import asyncio
import logging

from dilo.comm.protocol import GlobalState, SharedState
from dilo.comm.swarm_members import Membership
from dilo.comm.swarm_round import Rounds
from dilo.comm.swarm_state import StateTransfer

log = logging.getLogger("dilo")


def round_fields(lag: int, step: int, digest: str) -> dict:
    """Record fields for a peer whose state is at `step`: without overlap (lag 0) its next
    round is that step's, from that state; with overlap the round is stored when entered."""
    return {} if lag else {"round": step, "key": digest}


async def join_or_found(members: Membership, transfer: StateTransfer, rounds: Rounds, holder: SharedState, *,
                        min_peers: int, timeout: float, running_at: int) -> tuple[GlobalState | None, str]:
    """(the swarm's state this peer joins with, or None when it founds the run with the peers
    at the start gate; the digest of the state it starts from). Runs on the node's loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    published = warned = False
    own_digest = ""  # of the seeded θ, once this peer stands at the start gate
    me = members.node.name
    while True:
        view = await members.view()
        others = [m for m in view.members.values() if m.peer != me]
        if view.foreign and not warned:
            log.warning("%d peers with other run settings are in this swarm's DHT; they are ignored",
                        len(view.foreign))
            warned = True
        # Peers that passed the start gate together are all at step 0 with the seeded θ;
        # once one has finished a round, a newcomer joins mid-run instead.
        if any(m.training and m.step > 0 for m in others):
            state = await transfer.fetch(0)
            if state is not None:
                digest = transfer.last_download["digest"]
                transfer.known_digest = (state.outer_step, digest)
                rounds.set_step(state.outer_step)
                fields = dict(step=state.outer_step, digest=digest, pending=True, training=True,
                              **round_fields(holder.round_lag, state.outer_step, digest))
                if published:
                    await members.update(**fields)
                else:
                    members.me.update(fields)
                    await members.start()
                return state, digest
        elif running_at:  # the run we were pointed at is not visible (yet, or any more)
            pass
        elif not published:  # the start gate: a regular member at step 0 with the seeded θ
            own = await loop.run_in_executor(None, holder.export_state)
            own_digest = await loop.run_in_executor(None, own.digest)
            transfer.known_digest = (own.outer_step, own_digest)
            members.me.update(step=own.outer_step, digest=own_digest, pending=False, training=False,
                              min_peers=min_peers, round=own.outer_step, key=own_digest)
            rounds.set_step(own.outer_step)
            await members.start()
            published = True
            continue
        elif len(others) + 1 >= min_peers or any(m.training for m in others):
            await members.update(pending=False, training=True)
            log.info("starting the run with %d peers", len(others) + 1)
            return None, own_digest
        if loop.time() > deadline and running_at:
            raise RuntimeError(f"peers.initial was training (outer step {running_at}) but no peer "
                               f"of that run could serve its state within comm.timeout={timeout:.0f} s; "
                               "the run may have ended")
        if loop.time() > deadline:
            raise RuntimeError(f"only {len(others) + 1} of peers.min_peers={min_peers} peers "
                               f"(or no donor for the running swarm's state) within comm.timeout="
                               f"{timeout:.0f} s")
        await asyncio.sleep(0.5)
