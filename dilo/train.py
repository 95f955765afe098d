"""The training loop: one process = one DiLoCo worker, one rank of a worker, or one
data-parallel rank.

    torchrun --nproc-per-node 4 -m dilo.train --config configs/tiny.toml
    torchrun --nproc-per-node 4 -m dilo.train --config configs/tiny.toml --run.worker_size 2
    python -m dilo.train --config configs/tiny.toml          # a single worker

With run.worker_size = S > 1 (docs/islands.md) the processes form workers of S ranks:
DDP inside a worker, DiLoCo between workers through a HierarchicalGroup.

Reads top to bottom: config → world (world.py) → groups (comm/build.py) → model, data,
inner optimizer → DiLoCo (or DDP) (that start-up, and `close()`, in train_setup.py) → resume
(resume.py) → inner steps, outer steps, checkpoints, metrics → summary.

Faults (see docs/elastic.md): SIGTERM/Ctrl-C stops every rank at the next outer step with a
checkpoint, a summary marked `"stopped": true` and exit 0 (graceful_stop.py); a failed
exchange saves the last consistent global state before the process exits;
`checkpoint.resume auto` resumes exactly when the world size is unchanged and elastically
otherwise (resume.py).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from dilo.comm.membership import RunEnded, Superseded
from dilo.comm.protocol import DivergenceError
from dilo.config import parse_args
from dilo.config_help import help_text, wants_help
from dilo.graceful_stop import mark_exit, mark_start
from dilo.inner_loop import evaluate, lr_at
from dilo.stats import SyncStats
from dilo.train_report import log, mb
from dilo.train_setup import TrainerParts
from dilo.world import World


class Trainer(TrainerParts):
    """The steps of one worker over its parts (dilo/train_setup.py); `run()` is the whole training."""

    # -- steps --------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the worker's batch: rows r, r + S, r + 2S, ... (S = worker_size)."""
        x, y = self.state.batches.next_batch()
        size, r = self.world.worker_size, self.world.rank_in_worker
        return (x[r::size], y[r::size]) if size > 1 else (x, y)

    def run_inner_step(self) -> torch.Tensor:
        """One inner step; its loss as a detached 0-d tensor on the model's device (read with
        `float()` only when it is logged: no host synchronisation per inner step)."""
        lr = lr_at(self.cfg, self.rounds.lr_step(self.state.inner_step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.next_batch()
        net = self.ddp or self.model
        loss = net(x.to(self.world.device), y.to(self.world.device))
        loss.backward()
        if self.cfg.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.inner.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.inner_step += 1
        return loss.detach()

    def record_sync(self, stats: SyncStats, loss: torch.Tensor) -> None:
        if stats.adopted:
            self.follow_adoption()
        self.state.totals.add(stats)
        self.report.sync(stats, float(loss))

    def add_ddp_traffic(self) -> None:
        """Data-parallel bookkeeping at the outer-step cadence: ring all-reduce traffic."""
        workers = self.world.num_workers
        if workers > 1:
            per_step = 2 * (workers - 1) * 4 * math.ceil(self.model.num_params() / workers)
            self.state.totals.bytes_sent += per_step * self.cfg.outer.inner_steps
            self.state.totals.bytes_received += per_step * self.cfg.outer.inner_steps

    def outer_boundary(self, loss: torch.Tensor) -> bool:
        """The outer step, if this inner step ends a round; True if one ran."""
        try:
            if self.diloco:
                first = self.diloco.step(end_round=self.rounds.due(), report=self.rounds.report())
                if first is not None:
                    self.record_sync(first, loss)  # (before at_end: rounds by time end on the progress)
                stats = self.drain_at_end(loss) if self.at_end() else []
                if first is None and not stats:
                    return False
            elif self.state.inner_step % self.cfg.outer.inner_steps == 0:
                self.add_ddp_traffic()
            else:
                return False
        except DivergenceError as e:
            self.metrics.log("event", event="diverged", error=str(e), world=self.world_id)
            raise
        except RuntimeError as e:  # a peer died or timed out mid-exchange (heal mode: could not heal)
            if not isinstance(e, Superseded):  # (heal mode: its state is stale, the group's is newer)
                self.checkpoints.save_after_failure(e)
            raise
        self.take_new_shards()
        self.state.record_boundary()
        return True

    def drain_at_end(self, loss: torch.Tensor) -> list[SyncStats]:
        """The last boundary: every worker ends on the global θ (`DiLoCo.flush`), recorded.

        Also after an adoption: a state taken at the end of the run (a swarm peer that fell
        behind takes one a donor exported while its last rounds were in flight) brings those
        rounds, fetched, and puts the loop past run.steps at once; they are drained here, so
        every peer ends on the same outer step. A flush that adopts again is repeated."""
        stats: list[SyncStats] = []
        while True:
            flushed = self.diloco.flush(self.rounds.report())
            for s in flushed:
                self.record_sync(s, loss)
            stats += flushed
            if not (flushed and flushed[-1].adopted and self.at_end()):
                return stats

    def at_end(self) -> bool:
        """Whether run.steps is reached (never with run.steps = 0: train until stopped); with
        rounds by time or tokens, by the group's progress (dilo/rounds.py)."""
        if self.rounds.by_caller:
            return self.rounds.finished()
        return bool(self.cfg.run.steps) and self.state.inner_step >= self.cfg.run.steps

    def take_new_shards(self) -> None:
        """data.watch: the world agrees on the shards every process sees (dilo/data_stream.py)."""
        batches = self.state.batches
        if getattr(batches, "sync", None) is None:
            return
        batches.sync()
        batches.mark_boundary(self.state.outer_step)
        if batches.take_changed():
            self.eval_set = batches.eval_set(self.cfg.data.batch_size, self.cfg.data.eval_batches)

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluations: the worker's rank 0, or every rank of a sharded
        worker (run.shard = fsdp: the forward is a collective over the worker's ranks)."""
        return self.world.speaks_for_worker or self.cfg.run.shard == "fsdp"

    def evaluate_all(self) -> float:
        """The eval loss, and each eval.sets loss logged as its own `eval` record (field `set`)."""
        s, device = self.state, self.world.device
        for name, batches in self.eval_sets.items():
            self.metrics.log("eval", step=s.inner_step, outer_step=s.outer_step, set=name,
                             set_loss=evaluate(self.model, batches, device))
        return evaluate(self.model, self.eval_set, device)

    def stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT; one tiny collective per outer step."""
        try:
            return self.stopper.agreed(self.groups.world)
        except RuntimeError as e:
            if not isinstance(e, Superseded):
                self.checkpoints.save_after_failure(e)
            raise

    def save_checkpoint(self, loss: torch.Tensor) -> None:
        if self.diloco is not None and self.diloco.group.open_membership:
            # A swarm exchange may have handed back a newer state since the boundary: take it
            # first, so the checkpoint holds no superseded round.
            stats = self.diloco.settle()
            if stats is not None:
                self.record_sync(stats, loss)
        self.checkpoints.save()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to run.steps, or to a graceful stop; returns the summary (marked `stopped`)."""
        cfg, s = self.cfg, self.state
        self.stopper.install()
        (self.failover or self.checkpoints).restore()
        if self.failover is not None:  # heal mode: a joiner may have ended up in a newer world
            self.world_id = self.report.world_id = self.checkpoints.world_id
        tokens_per_step = cfg.data.batch_size * cfg.model.seq_len  # this process's share
        window_start, window_steps = time.perf_counter(), 0
        loop_start = time.perf_counter()
        stopped = False
        if not self.at_end():
            self.rounds.begin(first=True)
        while not self.at_end() and not stopped:
            try:
                step_start = time.perf_counter()
                loss = self.run_inner_step()
                if self.failover is not None:
                    self.failover.group.check_left_behind()  # (a store look-up only after a stall)
                self.slowdown.after_step(time.perf_counter() - step_start)  # run.slowdown (a testing aid)
                step_seconds = time.perf_counter() - step_start
                self.compute_seconds += step_seconds
                self.rounds.count(step_seconds)
                window_steps += 1
                synced = self.outer_boundary(loss)
                if s.inner_step % cfg.metrics.log_every == 0 or synced:
                    value = float(loss)  # the one host read of the loss, only when it is logged
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    self.metrics.log("inner", step=s.inner_step, outer_step=s.outer_step, loss=value,
                                     lr=self.optimizer.param_groups[0]["lr"], tokens=window_steps * tokens_per_step,
                                     tokens_per_s=tok_s)
                    self.metrics.progress(s.inner_step, loss=value, tok_per_s=tok_s, outer=s.outer_step)
                    window_start, window_steps = time.perf_counter(), 0
                if synced:
                    stopped = self.after_outer_step(loss)
                    if self.failover is not None and not stopped:
                        self.failover.boundary()  # heal mode: admit joiners, take a changed group's layout
                    if not stopped and not self.at_end():
                        self.rounds.begin()  # the next round starts now (on every worker alike)
            except Superseded as e:  # heal mode: the group went on without this worker (it was stopped)
                self.rejoin(e)
                window_start, window_steps = time.perf_counter(), 0
        self.loop_seconds = time.perf_counter() - loop_start
        if self.failover is not None and not stopped:
            self.failover.finish()
        return self.finish(stopped)

    def rejoin(self, error: Superseded) -> None:
        """Heal mode: join the running group again in this process, as a restarted worker would
        (dilo/failover.py `rejoin`: new incarnation, admission, the state from a member)."""
        self.failover.rejoin(error)
        self.world_id = self.report.world_id = self.checkpoints.world_id
        if not self.at_end():
            self.rounds.begin(first=True)

    def after_outer_step(self, loss: torch.Tensor) -> bool:
        """Evaluation, checkpoint and the stop request at an outer boundary; True to stop."""
        cfg, s = self.cfg, self.state
        if cfg.data.eval_every and s.outer_step % cfg.data.eval_every == 0 and self.evaluates:
            eval_loss = self.evaluate_all()  # (run.shard = fsdp: every rank runs the sharded forward)
            if self.world.speaks_for_worker:
                self.metrics.log("eval", step=s.inner_step, outer_step=s.outer_step, eval_loss=eval_loss)
        due = cfg.checkpoint.every and (s.outer_step % cfg.checkpoint.every == 0 or self.at_end())
        if due:
            self.save_checkpoint(loss)
        if self.publisher is not None and s.outer_step % cfg.publish.every == 0:
            self.publisher.publish()
        if self.at_end() or not self.stop_agreed():
            return False
        if not due:
            self.save_checkpoint(loss)
        self.checkpoints.writer.wait()
        log.warning("stopped at outer step %d (inner step %d) on %s; continue with "
                    "--checkpoint.resume auto", s.outer_step, s.inner_step,
                    self.stopper.signal_name or "a peer's request")
        self.metrics.log("event", event="stop", step=s.inner_step, outer_step=s.outer_step,
                         signal=self.stopper.signal_name, world=self.world_id)
        return True

    def finish(self, stopped: bool = False) -> dict:
        self.checkpoints.writer.wait()
        # Every rank joins this gather (a collective); then only the worker's rank 0
        # evaluates and writes summary-<worker>.json.
        per_rank = worker_totals(self.world, self.state.totals.to_dict())
        eval_loss = self.evaluate_all() if self.evaluates else None
        if not self.world.speaks_for_worker:
            return {}
        self.metrics.log("eval", step=self.state.inner_step, outer_step=self.state.outer_step,
                         eval_loss=eval_loss)
        summary = self.report.summary(eval_loss, per_rank, stopped, self.compute_seconds, self.loop_seconds)
        path = self.metrics.write_summary(summary)
        if self.groups.swarm is not None and not stopped:
            self.groups.swarm.finished()
        log.info("done%s: eval loss %.4f after %d inner steps (%d outer), %.1f s, sent %s, hash %s; "
                 "summary in %s", " (stopped)" if stopped else "", eval_loss, self.state.inner_step,
                 self.state.outer_step, summary["wall_seconds"], mb(summary["bytes_sent"]),
                 summary["global_hash"][:12], path)
        return summary

def worker_totals(world: World, totals: dict) -> list[dict]:
    """The byte totals of every rank of this worker (bytes_sent is per process); a collective
    over the island's ranks."""
    if world.island is None:
        return [totals]
    out: list = [None] * world.worker_size
    dist.all_gather_object(out, totals, group=world.island.intra_pg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text())  # on stdout, exit 0: help is an answer, not an error
        return 0
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"dilo: config error: {e}", file=sys.stderr)
        return 2
    mark_start()
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.run()
    except ValueError as e:  # user mistakes found after parsing (data path, checkpoint, ...)
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    except RunEnded as e:  # heal mode: a restarted worker found the run over
        print(f"dilo: {e}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
        print("dilo: interrupted", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    mark_exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
