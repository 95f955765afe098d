"""The training loop: one process = one DiLoCo worker, one rank of a worker, or one
data-parallel rank.

    torchrun --nproc-per-node 4 -m dilo.train --config configs/tiny.toml
    torchrun --nproc-per-node 4 -m dilo.train --config configs/tiny.toml --run.worker_size 2
    python -m dilo.train --config configs/tiny.toml          # a single worker

With run.worker_size = S > 1 (docs/islands.md) the processes form workers of S ranks:
DDP inside a worker, DiLoCo between workers through a HierarchicalGroup.

Reads top to bottom: config → process group → model, data, inner optimizer →
DiLoCo (or DDP) → resume → inner steps, outer steps, checkpoints, metrics → summary.

Faults (see docs/elastic.md): SIGTERM/Ctrl-C stops every rank at the next outer step with a
checkpoint and exit 0 (graceful_stop.py); a failed exchange saves the last consistent global
state before the process exits; `checkpoint.resume auto` resumes exactly when the world
size is unchanged and elastically otherwise (elastic.py).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import random
import secrets
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from dilo import checkpoint, elastic
from dilo.comm.hierarchical import HierarchicalGroup, Island, join_islands
from dilo.comm.torch_dist import TorchGroup, init_default_group, launched_by_torchrun
from dilo.comm.protocol import Group, SoloGroup
from dilo.config import Config, parse_args, validate_world_size
from dilo.data import ShardedBatches, eval_batches, load_tokens
from dilo.comm.protocol import DivergenceError
from dilo.diloco import DiLoCo, SyncStats
from dilo.graceful_stop import GracefulStop
from dilo.metrics import Metrics
from dilo.model import GPT, param_groups

log = logging.getLogger("dilo")


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup to inner.lr, then cosine decay to inner.min_lr_ratio * inner.lr."""
    peak, warmup, total = cfg.inner.lr, cfg.inner.warmup_steps, cfg.run.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * cfg.inner.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def params_hash(model: nn.Module, step: int) -> str:
    """Global hash for data-parallel mode: the (replicated) parameters and the step."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu", torch.float32).numpy().tobytes())
    h.update(step.to_bytes(8, "little"))
    return h.hexdigest()


def setup_logging(is_leader: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_leader else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = cuda but no CUDA device is visible; use run.device = cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    """State and steps of one worker; `run()` is the whole training."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.start_time = time.time()
        self.world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
        validate_world_size(cfg, self.world_size)  # before the rendezvous: every rank refuses alike
        distributed = self.world_size > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(cfg, self.local_rank)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // local_world))
        if distributed:
            init_default_group(cfg.comm.timeout, self.device.type == "cuda")
        self.rank = dist.get_rank() if distributed else 0
        # A worker is worker_size consecutive ranks; rank_in_worker 0 speaks for it
        # (summary, checkpoint, metrics-<worker>.jsonl).
        self.worker_size = cfg.run.worker_size
        self.worker: int | str
        self.worker, self.rank_in_worker = divmod(self.rank, self.worker_size)
        self.num_workers = self.world_size // self.worker_size
        self.island: Island | None = join_islands(self.worker_size) if self.worker_size > 1 else None
        self.is_leader = self.rank == 0
        setup_logging(self.is_leader)
        # A swarm peer is one worker; under torchrun (run.worker_size = world size) only
        # its rank 0 joins the swarm, the other ranks get everything through the island.
        self.swarm = None
        if cfg.comm.backend == "hivemind" and self.rank == 0:
            from dilo.comm.swarm import SwarmGroup

            self.swarm = SwarmGroup.from_config(cfg)
        try:
            self._build(cfg, distributed)
        except BaseException:
            if self.swarm is not None:
                self.swarm.close()
            raise

    def _build(self, cfg: Config, distributed: bool) -> None:
        shard, num_shards = self.worker, self.num_workers
        if cfg.comm.backend == "hivemind":  # a swarm has no ranks: each peer picks a shard of its own
            num_shards = cfg.peers.num_shards
            peer = None
            if self.swarm is not None:
                peer = (self.swarm.label, cfg.peers.shard if cfg.peers.shard >= 0
                        else self.swarm.data_shard(num_shards))
            if self.island is not None:  # the worker's other ranks learn its name and shard
                everyone: list = [None] * self.worker_size
                dist.all_gather_object(everyone, peer, group=self.island.intra_pg)
                peer = everyone[0]
            self.worker, shard = peer
        train_tokens, val_tokens = load_tokens(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction)
        if int(train_tokens.max()) >= cfg.model.vocab_size:
            raise ValueError(f"data.path holds token id {int(train_tokens.max())} but model.vocab_size "
                             f"is {cfg.model.vocab_size}; raise model.vocab_size")
        # The worker reads shard `worker` of num_workers with worker_size x data.batch_size
        # rows per step; its rank r trains on rows r, r + S, r + 2S, ... (see next_batch).
        # A worker of S ranks thus sees exactly the stream of a one-process worker with
        # S times the batch, and the position (batch_index) is the same on all its ranks.
        self.batches = ShardedBatches(train_tokens, shard, num_shards,
                                      cfg.data.batch_size * self.worker_size, cfg.model.seq_len)
        self.eval_set = eval_batches(val_tokens if len(val_tokens) else train_tokens,
                                     cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches)

        torch.manual_seed(cfg.run.seed)  # the same initial model on every worker
        random.seed(cfg.run.seed + shard)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.inner.weight_decay), lr=cfg.inner.lr,
            betas=(cfg.inner.beta1, cfg.inner.beta2), fused=False, foreach=False)
        # Every process of this torchrun world (elastic resume, stop requests); a swarm
        # peer is a world of its own.
        self.group = TorchGroup() if distributed else SoloGroup()
        self.world_id = self.group.all_gather_object(secrets.token_hex(4))[0]  # names this world
        self.diloco: DiLoCo | None = None
        self.ddp: nn.Module | None = None
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.step = 0
        if cfg.run.mode == "diloco":
            self.diloco = DiLoCo(self.model, self.optimizer, inner_steps=cfg.outer.inner_steps,
                                 outer_lr=cfg.outer.lr, outer_momentum=cfg.outer.momentum,
                                 nesterov=cfg.outer.nesterov, codec=cfg.comm.codec,
                                 group=self.outer_group(), block_size=cfg.comm.block_size,
                                 fragments=cfg.outer.fragments, delay=cfg.outer.delay,
                                 alpha=cfg.outer.alpha, overlap=cfg.outer.overlap,
                                 error_feedback=cfg.comm.error_feedback)
            if self.diloco.joined is not None:  # a swarm's state: continue at its global step
                self.step = self.diloco.inner_step
            if self.island:  # inner steps: data-parallel over the worker's own ranks only
                self.ddp = DistributedDataParallel(self.model, device_ids=device_ids,
                                                   process_group=self.island.intra_pg)
        elif distributed:
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        # Seconds of this process (not restored on resume): inner steps, and the whole loop.
        self.compute_seconds = 0.0
        self.loop_seconds = 0.0
        self.totals = {"bytes_sent": 0, "bytes_received": 0, "syncs": 0, "sync_seconds": 0.0,
                       "dropped": 0, "intra_bytes": 0, "peak_sync_bytes": 0,
                       "sync_seconds_hidden": 0.0, "sync_seconds_exposed": 0.0}
        self.writer = checkpoint.AsyncWriter()
        self.stopper = GracefulStop()
        self.record_boundary()

        port = cfg.metrics.port + self.local_rank if cfg.metrics.port else 0
        show = {"on": True, "off": False, "auto": None}[cfg.metrics.progress] if self.is_leader else False
        # metrics-<worker>.jsonl for the worker's rank 0, metrics-<worker>.<r>.jsonl for its rank r > 0
        name = str(self.worker) if self.rank_in_worker == 0 else f"{self.worker}.{self.rank_in_worker}"
        self.metrics = Metrics(cfg.run.dir, name, port=port, total_steps=cfg.run.steps,
                               progress=show)
        self.metrics.log("event", event="start", workers=self.num_workers, mode=cfg.run.mode,
                         worker_size=self.worker_size, rank=self.rank, world=self.world_id,
                         config=cfg.to_dict(), fingerprint=cfg.fingerprint(),
                         synced_params=self.diloco.numel if self.diloco else self.model.num_params())
        if self.swarm is not None:
            self.swarm.count = self.metrics.count
            self.metrics.log("event", event="swarm", peer=self.swarm.name, addresses=self.swarm.addresses,
                             shard=shard, num_shards=num_shards, outer_step=self.outer_step,
                             joined=self.diloco.joined is not None, download=self.swarm.transfer.last_download)

    def outer_group(self) -> Group:
        """Who DiLoCo averages with: every worker, as one member each."""
        overlapped = self.cfg.outer.delay > 0 or self.cfg.outer.overlap != "none"
        if self.cfg.comm.backend == "hivemind":
            if self.island is None:
                return self.swarm
            if not overlapped:
                return HierarchicalGroup(self.swarm, self.island.intra_pg, sliced=False)
            # Exchanges on a second set; the swarm's confirm runs on the training thread, on the
            # first set's intra group, between DDP's collectives (the same thread: never interleaved).
            island = join_islands(self.worker_size)
            return HierarchicalGroup(self.swarm, island.intra_pg, sliced=False, confirm_pg=self.island.intra_pg)
        # DiLoCo's process groups are its own (created here by every rank, in the same
        # order): with outer.delay or outer.overlap its collectives run on a background
        # thread, and collectives on one group must never interleave between threads
        # (dilo/overlap.py); the default group stays free for resume and stop requests,
        # the island's intra group for DDP.
        if self.island is None:
            if self.world_size == 1:
                return SoloGroup()
            timeout = datetime.timedelta(seconds=self.cfg.comm.timeout)
            return TorchGroup(dist.new_group(backend="gloo", timeout=timeout))
        island = self.island
        if overlapped:
            island = join_islands(self.worker_size)  # a second set: DDP keeps the first
        # Local rank r exchanges slice r with local rank r of every other worker.
        inter = TorchGroup(island.slice_pg) if self.num_workers > 1 else SoloGroup()
        return HierarchicalGroup(inter, island.intra_pg)

    @property
    def speaks_for_worker(self) -> bool:
        """The worker's rank 0 writes its summary and checkpoints and runs evaluations."""
        return self.rank_in_worker == 0

    # -- state --------------------------------------------------------------------------
    @property
    def outer_step(self) -> int:
        return self.diloco.outer_step if self.diloco else self.step // self.cfg.outer.inner_steps

    def global_hash(self) -> str:
        return self.diloco.global_hash() if self.diloco else params_hash(self.model, self.step)

    def state_dict(self) -> dict:
        """Everything to continue exactly; elastic.WORKER_KEYS and the inner optimizer are
        this worker's own, the rest is the same on every worker of the world."""
        state = {
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "num_workers": self.num_workers,
            "worker_size": self.worker_size,
            "worker": self.worker,
            "exact": True,
            "step": self.step,
            "outer_step": self.outer_step,
            "data": self.batches.state_dict(),
            "global_hash": self.global_hash(),
            "totals": dict(self.totals),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.diloco:
            state["diloco"] = self.diloco.state_dict()
            synced = {id(p) for p in self.diloco.params}
            state["model_rest"] = {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                                   if id(v) not in synced}
        else:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str, exact: bool = True) -> None:
        """Load a checkpoint; `exact=False` takes one merged by elastic.merge (a changed world)."""
        if state["fingerprint"] != self.cfg.fingerprint():
            raise ValueError(f"{source} was written with different model/outer/codec settings "
                             f"(fingerprint {state['fingerprint']} vs {self.cfg.fingerprint()}); "
                             "resume with the run's original config")
        if exact and state["num_workers"] != self.num_workers:
            raise ValueError(f"{source} was written by {state['num_workers']} workers, this run has "
                             f"{self.num_workers}; an exact resume needs the same number of workers")
        if state.get("worker_size", 1) != self.worker_size:
            raise ValueError(f"{source} was written with run.worker_size = {state.get('worker_size', 1)}, "
                             f"this run has {self.worker_size}; an exact resume needs the same worker size")
        self.step = int(state["step"])
        self.batches.load_state_dict(state["data"])
        if state.get("totals"):
            self.totals.update(state["totals"])
        if state.get("rng"):
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
        else:  # a worker slot new to this run: its own streams, reproducible
            torch.manual_seed(hash((self.cfg.run.seed, self.worker, self.step)) & 0xFFFFFFFF)
            random.seed(hash((self.cfg.run.seed, self.worker, self.step)))
        if self.diloco:
            self.model.load_state_dict({k: v for k, v in state["model_rest"].items()}, strict=False)
            self.diloco.load_state_dict(state["diloco"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.global_hash() != state["global_hash"]:
            raise checkpoint.CheckpointError(f"{source}: the loaded global state does not hash to "
                                             "the value recorded when it was saved")

    def resume(self) -> None:
        """Apply checkpoint.init_from / checkpoint.resume before the first step."""
        cfg = self.cfg.checkpoint
        if cfg.init_from:
            path = checkpoint.resolve_init_from(cfg.init_from)
            state = checkpoint.read_verified(path)
            if "diloco" in state:
                flat = state["diloco"]["global_params"]
                if self.diloco:
                    self.diloco.load_global_params(flat)
                else:
                    raise ValueError("checkpoint.init_from from a DiLoCo run needs run.mode = diloco")
            else:
                self.model.load_state_dict(state["model"])
            log.info("initialised weights from %s (new run: fresh optimizers, schedule, data)", path)
            return
        if not cfg.resume:
            existing = checkpoint.list_steps(self.cfg.run.dir)
            if existing:
                raise ValueError(f"run.dir {self.cfg.run.dir} already holds checkpoints (newest: step "
                                 f"{existing[-1]}); pass --checkpoint.resume auto to continue it, or "
                                 "choose another run.dir")
            return
        elastic.resume(self)
        self.record_boundary()

    def record_boundary(self) -> None:
        """Remember the counters of the last completed outer step (for save_after_failure)."""
        self.boundary = {"step": self.step, "data": self.batches.state_dict(),
                         "outer_step": self.outer_step,
                         "inner_step": self.diloco.inner_step if self.diloco else self.step}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the worker's batch: rows r, r + S, r + 2S, ... (S = worker_size)."""
        x, y = self.batches.next_batch()
        if self.worker_size > 1:
            x, y = x[self.rank_in_worker::self.worker_size], y[self.rank_in_worker::self.worker_size]
        return x, y

    # -- steps --------------------------------------------------------------------------
    def inner_step(self) -> float:
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.next_batch()
        net = self.ddp or self.model
        loss = net(x.to(self.device), y.to(self.device))
        loss.backward()
        if self.cfg.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.inner.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def after_sync(self, stats: SyncStats, loss: float) -> None:
        t = self.totals
        t["bytes_sent"] += stats.bytes_sent
        t["bytes_received"] += stats.bytes_received
        t["syncs"] += 1
        t["sync_seconds"] += stats.seconds
        t["dropped"] += stats.dropped
        t["intra_bytes"] += stats.intra_bytes
        t["peak_sync_bytes"] = max(t["peak_sync_bytes"], stats.bytes_sent)
        t["sync_seconds_hidden"] += stats.seconds_hidden
        t["sync_seconds_exposed"] += stats.seconds_exposed
        self.metrics.log("sync", step=self.step, outer_step=stats.outer_step, loss=loss,
                         fragment=stats.fragment, seconds=stats.seconds,
                         seconds_hidden=stats.seconds_hidden, seconds_exposed=stats.seconds_exposed,
                         bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
                         intra_bytes=stats.intra_bytes, peers=stats.num_peers,
                         global_hash=stats.global_hash, dropped=stats.dropped,
                         codec_error=stats.codec_error, pseudo_grad_norm=stats.pseudo_grad_norm,
                         world=self.world_id, adopted=stats.adopted)
        if stats.dropped:
            self.metrics.count("dropped_contributions", stats.dropped)
        intra = f" (+{_mb(stats.intra_bytes)} in-worker)" if stats.intra_bytes else ""
        frag = f" | fragment {stats.fragment}" if self.cfg.outer.fragments > 1 else ""
        hidden = f" ({stats.seconds_hidden:.3f} s hidden)" if stats.seconds_hidden else ""
        log.info("outer %d | step %d%s | loss %.4f | sent %s recv %s%s | %.3f s%s | peers %d | hash %s",
                 stats.outer_step, self.step, frag, loss, _mb(stats.bytes_sent), _mb(stats.bytes_received),
                 intra, stats.seconds, hidden, stats.num_peers, stats.global_hash[:12])

    def ddp_round(self) -> None:
        """Data-parallel bookkeeping at the outer-step cadence: ring all-reduce traffic."""
        if self.num_workers > 1:
            numel = self.model.num_params()
            per_step = 2 * (self.num_workers - 1) * 4 * math.ceil(numel / self.num_workers)
            self.totals["bytes_sent"] += per_step * self.cfg.outer.inner_steps
            self.totals["bytes_received"] += per_step * self.cfg.outer.inner_steps

    def outer_boundary(self, loss: float) -> bool:
        """The outer step, if this inner step ends a round; True if one ran."""
        try:
            if self.diloco:
                stats = [self.diloco.step()]
                if self.step == self.cfg.run.steps and not (stats[0] and stats[0].adopted):
                    stats += self.diloco.flush()  # every worker ends on the global θ
                stats = [s for s in stats if s is not None]
                if not stats:
                    return False
                for s in stats:
                    if s.adopted:  # took the swarm's newer state: continue at its global step
                        self.step = self.diloco.inner_step
                    self.after_sync(s, loss)
            elif self.step % self.cfg.outer.inner_steps == 0:
                self.ddp_round()
            else:
                return False
        except DivergenceError as e:
            self.metrics.log("event", event="diverged", error=str(e), world=self.world_id)
            raise
        except RuntimeError as e:  # a peer died or timed out mid-exchange
            elastic.save_after_failure(self, e)
            raise
        self.record_boundary()
        return True

    def stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT; one tiny collective per outer step."""
        try:
            return self.stopper.agreed(self.group)
        except RuntimeError as e:
            elastic.save_after_failure(self, e)
            raise

    def save_checkpoint(self, loss: float) -> None:
        if self.diloco is not None and self.diloco.group.open_membership:
            # A swarm exchange may have handed back a newer state since the boundary: take it
            # first, so the checkpoint holds no superseded round.
            stats = self.diloco.settle()
            if stats is not None:
                self.step = self.diloco.inner_step
                self.after_sync(stats, loss)
        # One file per worker: its ranks hold the same θ, inner optimizer state (DDP),
        # data position and RNG states (same seed, same ops), so rank 0's is everyone's.
        if not self.speaks_for_worker:
            return
        args = (self.cfg.run.dir, self.worker, self.outer_step, self.state_dict(),
                self.cfg.checkpoint.keep, self.num_workers)
        if not self.cfg.checkpoint.async_:
            path = checkpoint.save(*args)
            self.metrics.log("event", event="checkpoint", path=str(path), outer_step=self.outer_step)
            return
        busy = self.writer.busy
        path, waited = self.writer.save(*args)
        if busy:  # bounded memory: one write in flight, so this request had to wait for it
            log.warning("checkpoint of outer step %d waited %.2f s for the previous write; the "
                        "disk is slower than checkpoint.every rounds", self.outer_step, waited)
            self.metrics.count("checkpoint_waits")
        self.metrics.log("event", event="checkpoint", path=str(path), outer_step=self.outer_step,
                         background=True, waited_seconds=waited if busy else 0.0)

    def run(self) -> dict | None:
        """Train to run.steps and return the summary, or None after a graceful stop."""
        cfg = self.cfg
        self.stopper.install()
        self.resume()
        tokens_per_step = cfg.data.batch_size * cfg.model.seq_len  # this process's share
        window_start, window_steps = time.perf_counter(), 0
        loop_start = time.perf_counter()
        while self.step < cfg.run.steps:
            step_start = time.perf_counter()
            loss = self.inner_step()
            self.compute_seconds += time.perf_counter() - step_start
            window_steps += 1
            synced = self.outer_boundary(loss)
            if self.step % cfg.metrics.log_every == 0 or synced:
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                self.metrics.log("inner", step=self.step, outer_step=self.outer_step, loss=loss,
                                 lr=lr_at(cfg, self.step - 1), tokens=window_steps * tokens_per_step,
                                 tokens_per_s=tok_s)
                self.metrics.progress(self.step, loss=loss, tok_per_s=tok_s, outer=self.outer_step)
                window_start, window_steps = time.perf_counter(), 0
            if synced:
                if (cfg.data.eval_every and self.outer_step % cfg.data.eval_every == 0
                        and self.speaks_for_worker):
                    self.metrics.log("eval", step=self.step, outer_step=self.outer_step,
                                     eval_loss=evaluate(self.model, self.eval_set, self.device))
                due = cfg.checkpoint.every and (self.outer_step % cfg.checkpoint.every == 0
                                                or self.step == cfg.run.steps)
                if due:
                    self.save_checkpoint(loss)
                if self.step < cfg.run.steps and self.stop_agreed():
                    if not due:
                        self.save_checkpoint(loss)
                    self.writer.wait()
                    log.warning("stopped at outer step %d (inner step %d) on %s; continue with "
                                "--checkpoint.resume auto", self.outer_step, self.step,
                                self.stopper.signal_name or "a peer's request")
                    self.metrics.log("event", event="stop", step=self.step, outer_step=self.outer_step,
                                     signal=self.stopper.signal_name, world=self.world_id)
                    return None
        self.loop_seconds = time.perf_counter() - loop_start
        return self.finish()

    def finish(self) -> dict:
        self.writer.wait()
        # Every rank joins this gather (a collective); then only the worker's rank 0
        # evaluates and writes summary-<worker>.json.
        per_rank = self.worker_totals()
        if not self.speaks_for_worker:
            return {}
        eval_loss = evaluate(self.model, self.eval_set, self.device)
        self.metrics.log("eval", step=self.step, outer_step=self.outer_step, eval_loss=eval_loss)
        summary = {
            "worker": self.worker,
            "num_workers": self.swarm.size if self.swarm else self.num_workers,
            "mode": self.cfg.run.mode,
            "codec": self.cfg.comm.codec if self.diloco else "fp32",
            "outer_steps": self.outer_step,
            "inner_steps": self.step,
            "tokens": self.batches.tokens_consumed,
            "final_eval_loss": eval_loss,
            "wall_seconds": time.time() - self.start_time,
            "bytes_sent": self.totals["bytes_sent"],
            "bytes_received": self.totals["bytes_received"],
            "bytes_are_estimated": self.diloco is None,
            "sync_seconds": self.totals["sync_seconds"],
            "worker_size": self.worker_size,
            "intra_bytes": self.totals["intra_bytes"],
            "worker_bytes_sent": sum(t["bytes_sent"] for t in per_rank),
            "worker_bytes_received": sum(t["bytes_received"] for t in per_rank),
            "compute_seconds": self.compute_seconds,
            "loop_seconds": self.loop_seconds,
            "sync_seconds_hidden": self.totals["sync_seconds_hidden"],
            "sync_seconds_exposed": self.totals["sync_seconds_exposed"],
            "peak_sync_bytes": self.totals["peak_sync_bytes"],
            "fragments": self.cfg.outer.fragments,
            "overlap": self.cfg.outer.overlap,
            "error_feedback": self.cfg.comm.error_feedback,
            "dropped_contributions": self.totals["dropped"],
            "synced_params": self.diloco.numel if self.diloco else self.model.num_params(),
            "global_hash": self.global_hash(),
            "fingerprint": self.cfg.fingerprint(),
            "world": self.world_id,
        }
        self.metrics.write_summary(summary)
        if self.swarm is not None:
            self.swarm.finished()
        log.info("done: eval loss %.4f after %d inner steps (%d outer), %.1f s, sent %s, hash %s",
                 eval_loss, self.step, self.outer_step, summary["wall_seconds"],
                 _mb(summary["bytes_sent"]), summary["global_hash"][:12])
        return summary

    def worker_totals(self) -> list[dict]:
        """The byte totals of every rank of this worker (bytes_sent is per process)."""
        if self.island is None:
            return [self.totals]
        out: list = [None] * self.worker_size
        dist.all_gather_object(out, self.totals, group=self.island.intra_pg)
        return out

    def close(self) -> None:
        try:
            self.writer.wait()
        except checkpoint.CheckpointError as e:
            log.error("%s", e)
        self.stopper.uninstall()
        if self.diloco:
            self.diloco.close()
        self.metrics.close()
        if self.swarm is not None:
            self.swarm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"dilo: config error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.run()
    except ValueError as e:  # user mistakes found after parsing (data path, checkpoint, ...)
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
        print("dilo: interrupted", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
