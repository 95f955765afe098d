"""When and where a worker's state is saved and restored: `checkpoint.init_from`,
`checkpoint.resume`, the checkpoints of outer steps (sync or in the background) and the
save after a failed exchange. The file format is dilo/checkpoint.py, the state
dilo/worker_state.py, the resume plan dilo/resume.py.
"""

from __future__ import annotations

import logging

from dilo import checkpoint, resume, shard_checkpoint
from dilo.comm.protocol import Group
from dilo.config import Config
from dilo.metrics import Metrics
from dilo.worker_state import WorkerState
from dilo.world import World

log = logging.getLogger("dilo")


class Checkpoints:
    def __init__(self, cfg: Config, world: World, world_group: Group, state: WorkerState,
                 metrics: Metrics, world_id: str):
        self.cfg, self.world, self.world_group, self.state = cfg, world, world_group, state
        self.metrics, self.world_id = metrics, world_id
        self.writer = checkpoint.AsyncWriter()

    def restore(self) -> None:
        """Apply checkpoint.init_from / checkpoint.resume before the first step (a collective)."""
        k, run_dir, s = self.cfg.checkpoint, self.cfg.run.dir, self.state
        if k.resume == "fresh":
            self.set_aside()
        if k.init_from:
            s.init_from(k.init_from)
            return
        if k.resume in ("", "fresh"):
            existing = checkpoint.list_steps(run_dir)
            if existing:
                raise ValueError(f"run.dir {run_dir} already holds checkpoints (newest: step "
                                 f"{existing[-1]}); pass --checkpoint.resume auto to continue it, "
                                 "--checkpoint.resume fresh to set them aside and start over, or "
                                 "choose another run.dir")
            return
        if self.cfg.run.shard == "fsdp":  # one file per rank (dilo/shard_checkpoint.py)
            how = shard_checkpoint.restore(s, self.world, self.world_group, k.resume)
            if how is not None:
                log.info("resumed (%s) at inner step %d, outer step %d", how, s.inner_step, s.outer_step)
                self.metrics.log("event", event="resume", path=run_dir, how=how, step=s.inner_step,
                                 outer_step=s.outer_step, workers=s.num_workers, world=self.world_id,
                                 global_hash=s.global_hash())
            return
        shard_checkpoint.refuse_unsharded_resume(run_dir)
        # heal mode: every worker is a world of one; its rank is the one in the group (slots may have gaps)
        rank = self.world_group.rank if self.cfg.run.failover == "heal" else self.world.rank
        found = resume.resume(resume.ResumeContext(run_dir, k.resume, s.worker, self.world.num_workers,
                                                   rank, self.world_group))
        if found is None:
            return
        s.load_state_dict(found.state, found.source, exact=found.exact)
        plan = found.plan
        log.info("resumed from %s (%s: written by %d workers, now %d) at inner step %d, outer step "
                 "%d; inner optimizer state %s", plan.dir, plan.kind, plan.written_by, s.num_workers,
                 s.inner_step, s.outer_step,
                 "fresh" if found.inner_from is None else f"from outer step {found.inner_from}")
        self.metrics.log("event", event="resume", path=plan.dir, how=plan.kind, step=s.inner_step,
                         outer_step=s.outer_step, written_by=plan.written_by, workers=s.num_workers,
                         inner_from=found.inner_from, world=self.world_id, global_hash=s.global_hash())

    def set_aside(self) -> None:
        """`checkpoint.resume fresh`: the run.dir's checkpoints renamed, not deleted (a collective:
        no process starts writing new ones before every process has moved or seen them moved)."""
        aside = checkpoint.set_aside(self.cfg.run.dir) if self.world.speaks_for_worker else None
        self.world_group.all_gather_object(None)
        if aside is not None:
            log.warning("checkpoint.resume = fresh: set the existing checkpoints aside in %s; "
                        "starting from step 0", aside)
            self.metrics.log("event", event="checkpoints_set_aside", path=str(aside))

    def save(self) -> None:
        """This worker's file for the current outer step (its rank 0 writes for all its ranks)."""
        if self.cfg.run.shard == "fsdp":  # one file per rank, then the worker's manifest
            path = shard_checkpoint.save(self.state, self.world, self.cfg.checkpoint.keep)
            self.metrics.log("event", event="checkpoint", path=str(path), outer_step=self.state.outer_step)
            return
        # One file per worker: its ranks hold the same θ, inner optimizer state (DDP),
        # data position and RNG states (same seed, same ops), so rank 0's is everyone's.
        if not self.world.speaks_for_worker:
            return
        s, k = self.state, self.cfg.checkpoint
        args = (self.cfg.run.dir, s.worker, s.outer_step, s.state_dict(), k.keep, s.num_workers)
        if not k.async_:
            path = checkpoint.save(*args)
            self.metrics.log("event", event="checkpoint", path=str(path), outer_step=s.outer_step)
            return
        busy = self.writer.busy
        path, waited = self.writer.save(*args)
        if busy:  # bounded memory: one write in flight, so this request had to wait for it
            log.warning("checkpoint of outer step %d waited %.2f s for the previous write; the "
                        "disk is slower than checkpoint.every rounds", s.outer_step, waited)
            self.metrics.count("checkpoint_waits")
        self.metrics.log("event", event="checkpoint", path=str(path), outer_step=s.outer_step,
                         background=True, waited_seconds=waited if busy else 0.0)

    def save_after_failure(self, error: BaseException) -> None:
        """A failed exchange: keep the last consistent global state (resume.save_after_failure)."""
        s, k = self.state, self.cfg.checkpoint
        log.error("exchange failed at outer step %d: %s", s.outer_step + 1, str(error)[:300])
        if not (s.diloco and k.every and k.on_failure and self.world.speaks_for_worker) or s.outer_step == 0:
            return
        if self.cfg.run.shard == "fsdp":
            log.error("run.shard = fsdp writes no checkpoint after a failed exchange (each rank holds one "
                      "chunk; its worker's ranks may be gone): resume from the last outer step's checkpoint")
            return
        boundary = s.failure_boundary()
        try:
            self.writer.wait()  # a background write of this very step may still be running
        except checkpoint.CheckpointError as e:
            log.error("%s", e)
        path = resume.save_after_failure(self.cfg.run.dir, s.worker, s.num_workers, k.keep,
                                         s.outer_step, s.state_dict, boundary)
        if path is not None:
            self.metrics.log("event", event="checkpoint", path=str(path), outer_step=s.outer_step,
                             on_failure=True, error=str(error)[:300], world=self.world_id,
                             global_hash=s.global_hash())
