"""What the trainer tells the user: the start line, one line per outer step, the summary.

Kept beside dilo/train.py so the loop there reads without its formatting; the stats'
fields come from dilo/stats.py (declared once).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from dilo import codec_kernels
from dilo.config import Config
from dilo.metrics import Metrics
from dilo.stats import SyncStats, sync_record
from dilo.worker_state import WorkerState
from dilo.world import World

log = logging.getLogger("dilo")


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class LateCounts:
    """The swarm's counter hook (`count(name, value=1.0, **labels)`): events that arrive
    before the metrics exist (the swarm is built first: it names the worker) are kept and
    handed over when `attach` gives the sink. Called from the swarm's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sink: Callable[..., None] | None = None
        self._early: list[tuple[str, float, dict]] = []

    def __call__(self, name: str, value: float = 1.0, **labels: Any) -> None:
        with self._lock:
            if self._sink is None:
                self._early.append((name, value, labels))
                return
        self._sink(name, value, **labels)

    def attach(self, sink: Callable[..., None]) -> None:
        with self._lock:
            self._sink, early, self._early = sink, self._early, []
        for name, value, labels in early:
            sink(name, value, **labels)


def open_metrics(cfg: Config, world: World, worker: int | str) -> tuple[Metrics, int]:
    """This process's metrics (and the endpoint's port, 0 = off): metrics-<worker>.jsonl for
    the worker's rank 0, metrics-<worker>.<r>.jsonl for its rank r > 0."""
    port = cfg.metrics.port + world.local_rank if cfg.metrics.port else 0
    show = {"on": True, "off": False, "auto": None}[cfg.metrics.progress] if world.is_leader else False
    name = str(worker) if world.speaks_for_worker else f"{worker}.{world.rank_in_worker}"
    return Metrics(cfg.run.dir, name, port=port, host=cfg.metrics.host, total_steps=cfg.run.steps,
                   progress=show), port


class RunReport:
    """The start line, the sync lines and the summary of one process, from explicit inputs.

    Built once the metrics exist; what changes during the run (the worker's state, the
    loop's seconds) is passed to each call, so this module never sees the Trainer.
    """

    def __init__(self, cfg: Config, world: World, metrics: Metrics, world_id: str, state: WorkerState,
                 synced_params: int, swarm: Any | None, start_time: float):
        self.cfg, self.world, self.metrics, self.world_id = cfg, world, metrics, world_id
        self.state, self.synced_params, self.swarm = state, synced_params, swarm
        self.start_time = start_time  # time.time() when the process began its set-up

    def start(self, model_params: int, shard: int, num_shards: int, port: int, joined: bool) -> None:
        """The start line (INFO) and the JSONL start event (and the swarm's)."""
        cfg, w, s = self.cfg, self.world, self.state
        self.metrics.log("event", event="start", workers=w.num_workers, mode=cfg.run.mode,
                         worker_size=w.worker_size, rank=w.rank, world=self.world_id,
                         config=cfg.to_dict(), fingerprint=cfg.fingerprint(), synced_params=self.synced_params)
        if self.swarm is not None:
            self.metrics.log("event", event="swarm", shard=shard, num_shards=num_shards,
                             outer_step=s.outer_step, joined=joined, **self.swarm.describe())
        every = cfg.checkpoint.every
        log.info("run.dir %s: %s worker%s (worker_size %d), %s, model %.2fM params; metrics %s, summary "
                 "%s/summary-<worker>.json, checkpoints %s%s", cfg.run.dir,
                 "swarm" if self.swarm is not None else w.num_workers, "" if w.num_workers == 1 else "s",
                 w.worker_size, cfg.run.mode, model_params / 1e6, self.metrics.path, cfg.run.dir,
                 f"{cfg.run.dir}/checkpoints every {every} outer steps" if every else "off",
                 f"; metrics endpoint on {cfg.metrics.host}:{port} (/metrics)" if port else "")

    def sync(self, stats: SyncStats, loss: float) -> None:
        """The JSONL `sync` line and the INFO line of one outer step."""
        inner_step = self.state.inner_step
        self.metrics.log("sync", step=inner_step, loss=loss, **sync_record(stats), world=self.world_id)
        for member, reason in stats.rejected:  # issue 13: each one visible (docs/robust.md)
            log.warning("outer %d: dropped the contribution of worker %s: %s", stats.outer_step, member, reason)
            self.metrics.count("dropped_contributions", 1, contributor=member)
        if stats.dropped > len(stats.rejected):  # (an island's other ranks: the leader names them)
            self.metrics.count("dropped_contributions", stats.dropped - len(stats.rejected))
        for member, factor in stats.clipped_members:
            log.warning("outer %d: clipped the contribution of worker %s by %.3g (outer.aggregate = clip)",
                        stats.outer_step, member, factor)
            self.metrics.count("clipped_contributions", 1, contributor=member)
        for name in ("skipped", "reset_residuals", "withheld"):
            if getattr(stats, name):
                self.metrics.count({"skipped": "skipped_outer_steps", "withheld": "withheld_contributions"}
                                   .get(name, name), getattr(stats, name))
        intra = f" (+{mb(stats.intra_bytes)} in-worker)" if stats.intra_bytes else ""
        frag = f" | fragment {stats.fragment}" if self.cfg.outer.fragments > 1 else ""
        hidden = f" ({stats.seconds_hidden:.3f} s hidden)" if stats.seconds_hidden else ""
        hashed = ("" if stats.hash_step == stats.outer_step else " (none yet)" if stats.hash_step < 0
                  else f" (of outer {stats.hash_step})")  # outer.digest = background: the previous state's
        log.info("outer %d | step %d%s | loss %.4f | sent %s recv %s%s | %.3f s%s | peers %d | hash %s%s",
                 stats.outer_step, inner_step, frag, loss, mb(stats.bytes_sent), mb(stats.bytes_received),
                 intra, stats.seconds, hidden, stats.num_peers, stats.global_hash[:12] or "-", hashed)

    def summary(self, eval_loss: float, per_rank: list[dict], stopped: bool, compute_seconds: float,
                loop_seconds: float) -> dict:
        """summary-<worker>.json: the run's settings, counters, times and totals (stats.RunTotals)."""
        cfg, s, swarm = self.cfg, self.state, self.swarm
        diloco = cfg.run.mode == "diloco"
        return {
            "worker": s.worker,
            "num_workers": swarm.size if swarm else self.world.num_workers,
            "mode": cfg.run.mode,
            "codec": cfg.comm.codec if diloco else "fp32",
            "codec_kernels": codec_kernels.BACKEND,  # "torch" when the numba kernels are missing
            "outer_steps": s.outer_step,
            "inner_steps": s.inner_step,
            "tokens": s.batches.tokens_consumed,
            "final_eval_loss": eval_loss,
            "wall_seconds": time.time() - self.start_time,
            **s.totals.summary(),
            "bytes_are_estimated": not diloco,
            "worker_size": self.world.worker_size,
            "worker_bytes_sent": sum(r["bytes_sent"] for r in per_rank),
            "worker_bytes_received": sum(r["bytes_received"] for r in per_rank),
            "compute_seconds": compute_seconds,
            "loop_seconds": loop_seconds,
            "fragments": cfg.outer.fragments,
            "overlap": cfg.outer.overlap,
            "error_feedback": cfg.comm.error_feedback or (diloco and cfg.comm.codec == "sparse"),  # sparse: always
            "synced_params": self.synced_params,
            "shard": cfg.run.shard,
            "outer_state_bytes": s.diloco.state_bytes() if s.diloco else 0,  # this process's θ + momentum (+ EF)
            "global_hash": s.global_hash(),
            "fingerprint": cfg.fingerprint(),
            "world": self.world_id,
            "stopped": stopped,
        }
