"""`run.failover = heal` on the trainer's side: joining, state transfer, re-layout.

dilo/comm/heal.py keeps the group alive (a failed collective is committed by nobody and
redone by the survivors in a new epoch); this module does what the training loop must
do when the members change (docs/elastic.md, "Live failover"):

- start (`restore`): a world formed from nothing resumes from checkpoints as in restart
  mode (resume.py, over the new group); a process that finds a running group registers,
  waits to be admitted at a round boundary and downloads the global state from a member.
- round boundary (`boundary`, after the outer step, the evaluation, the checkpoint and the
  stop agreement): pending joiners are admitted (a new epoch) and get the state; after a
  heal or an admission every member takes its new rank as its data shard.
- rejoining (`rejoin`): a worker the group went on without (it was stopped past the
  heartbeat) becomes a new incarnation in the same process, drops what is its own
  (AdamW moments, the round's partial pseudo-gradient) and joins as in `restore`.
- the state transfer (`transfer`) is resume.broadcast_global_state from the lowest member
  that holds the state (θ, outer momentum, step counters, data position; the joiner's
  AdamW moments and RNG start fresh), checked twice: the loaded state must hash to the
  value recorded in it, and every member must hold the same hash afterwards.
"""

from __future__ import annotations

import logging

from dilo import resume
from dilo.comm.heal import HealingGroup, follow
from dilo.comm.membership import HealError
from dilo.comm.protocol import DivergenceError
from dilo.config import Config
from dilo.world import World

log = logging.getLogger("dilo")


class Failover:
    """The trainer's hooks for heal mode (module docstring)."""

    def __init__(self, cfg: Config, group: HealingGroup, world: World, state, checkpoints, metrics):
        self.cfg, self.group, self.world, self.state = cfg, group, world, state
        self.checkpoints, self.metrics = checkpoints, metrics

    def restore(self, may_form: bool = True) -> None:
        """Before the first step: join if needed, then the state (checkpoints or a live member)."""
        g = self.group
        if not g.admitted:
            log.info("heal: slot %d asks to join the running group", self.cfg.run.slot)
            g.enter(g.membership.join(self.cfg.run.workers, self.cfg.run.min_workers, grace=self.cfg.comm.timeout,
                                      joining=g.world_id, may_form=may_form))
            # (the world it found may have ended meanwhile: then it formed or joined a new one)
            self.checkpoints.world_id = g.world_id
        if g.needs_state:
            self.relayout()
            self.transfer()
        else:
            self.relayout()
            self.checkpoints.restore()
        g.healable = True
        g.changed = False
        self.log_events()

    def rejoin(self, error: BaseException) -> None:
        """The group went on without this worker (`Superseded`): join again without a restart.

        What a restarted process would start fresh is dropped here: the inner AdamW moments,
        and (by the transfer's load, as for any joiner) the round's partial Δ, θ, the outer
        state, the step counters, the data position and the RNG. Its totals are kept (this
        process's bytes and seconds)."""
        s = self.state
        log.warning("heal: %s; slot %d rejoins in-process as a new incarnation", str(error)[:300], self.cfg.run.slot)
        self.metrics.log("event", event="rejoin", how="in_process", step=s.inner_step, outer_step=s.outer_step,
                         world=self.group.world_id, error=str(error)[:300])
        self.group.leave()
        s.optimizer.state.clear()  # (a fresh AdamW's state: moments and step counts start again)
        self.restore(may_form=False)  # (a world formed anew resumes from checkpoints: a restart's job)

    def boundary(self) -> None:
        """After a round's outer step: admit the pending joiners, re-layout after any change."""
        g = self.group
        if g.admit():
            self.relayout()
            self.transfer()
        if g.changed:
            self.relayout()
            g.changed = False
        self.log_events()

    def transfer(self) -> None:
        """The global state from the lowest member that holds it to every member that needs it."""
        g, s = self.group, self.state

        def send_or_receive(eg) -> dict:
            needs = eg.all_gather_object(g.needs_state)
            if all(needs):
                raise HealError("no member of the group holds the global state any more; restarting the world")
            src = needs.index(False)
            return resume.broadcast_global_state(eg, s.state_dict() if eg.rank == src else None, src)

        shared = g.guarded(send_or_receive)
        if g.needs_state:  # load_state_dict checks that the state hashes to the value recorded in it
            s.load_state_dict(resume.merge(shared, None), "the state downloaded from a live member", exact=False)
            self.relayout()  # (loading re-cut the data lanes from the sender's)
            log.info("heal: downloaded the global state of outer step %d (inner step %d, hash %s) from a live "
                     "member", s.outer_step, s.inner_step, s.global_hash()[:12])
            self.metrics.log("event", event="resume", how="live", step=s.inner_step, outer_step=s.outer_step,
                             workers=g.size, world=g.world_id, global_hash=s.global_hash(), path="", written_by=0,
                             inner_from=None)
        hashes = g.guarded(lambda eg: eg.all_gather_object(s.global_hash()))
        if len(set(hashes)) != 1:
            raise DivergenceError(f"after the state transfer the members hold different states: {hashes}")
        g.state_received()

    def relayout(self) -> None:
        """This worker's data shard is its rank; every worker advances the position by size x B."""
        g, s = self.group, self.state
        follow(self.world, g)
        s.num_workers = g.size
        s.batches.shard, s.batches.num_shards = g.rank, g.size
        s.record_boundary()

    def log_events(self) -> None:
        for e in self.group.events:
            self.metrics.log("event", step=self.state.inner_step, outer_step=self.state.outer_step,
                             world=self.group.world_id, **e)
        self.group.events.clear()

    def finish(self) -> None:
        """The run is over: workers still waiting to join stop waiting."""
        self.group.membership.mark_finished(self.group.world_id)
