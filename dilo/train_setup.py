"""The start-up of one training process: the parts `Trainer` (dilo/train.py) runs its loop over.

Built in this order: world (world.py) → groups (comm/build.py) → data → model → inner
optimizer → DiLoCo or DDP (`wrap_model`) → worker state → round clock → metrics →
checkpoints → run report → publisher and failover. A joiner of a running swarm takes the
swarm's step here (`follow_adoption`). `close()` ends them all, also after a failed start.
"""

from __future__ import annotations

import copy
import random
import secrets
import time
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dilo import checkpoint
from dilo.checkpointing import Checkpoints
from dilo.codecs import get_codec
from dilo.comm.build import build_groups, worker_identity
from dilo.comm.protocol import Group
from dilo.comm.sharded import ShardedGroup
from dilo.config import Config
from dilo.data_stream import attach_swarm
from dilo.diloco import DiLoCo
from dilo.failover import Failover
from dilo.graceful_stop import GracefulStop
from dilo.inner_loop import load_data, load_eval_sets
from dilo.lora import base_digest
from dilo.model import param_groups
from dilo.model_build import BuiltModel, attach_aggregation, build_model, frozen_tensors
from dilo.publish import Publisher
from dilo.rounds import RoundClock, Slowdown
from dilo.sharded_state import ShardedDiLoCo, shard_model
from dilo.train_report import LateCounts, RunReport, log, open_metrics
from dilo.worker_state import WorkerState
from dilo.world import World, join_world


class TrainerParts:
    """World, groups, data, model, optimizer, DiLoCo, state, metrics, checkpoints and report
    of one process; `Trainer` adds the steps and the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.start_time = time.time()
        self.world = join_world(cfg)
        self.counts = LateCounts()  # the swarm counts events before the metrics exist
        self.groups = build_groups(cfg, self.world, self.counts)
        try:
            self._build(cfg)
        except BaseException:
            self.groups.close()
            raise

    def _build(self, cfg: Config) -> None:
        world = self.world
        worker, shard, num_shards = worker_identity(cfg, world, self.groups.swarm)
        batches, self.eval_set = load_data(cfg, shard, num_shards, world.worker_size, self.groups.world,
                                           lambda: getattr(self, "stopper", None) is not None
                                           and self.stopper.requested)
        if cfg.data.watch and self.groups.swarm is not None:
            attach_swarm(batches, self.groups.swarm)  # shards agreed through the rounds
        self.eval_sets = load_eval_sets(cfg)
        torch.manual_seed(cfg.run.seed)  # the same initial model on every worker
        random.seed(cfg.run.seed + shard)
        self.built = build_model(cfg, world.device)  # GPT or hf, with LoRA (docs/adapters.md)
        self.model = self.built.model
        if cfg.run.shard == "fsdp":  # FSDP2 over the worker's ranks, before the optimizer sees the params
            shard_model(self.model, world.island.intra_pg, world.device)
        if self.groups.swarm is not None and cfg.model.lora_rank:  # a joiner's base must be the donors'
            self.groups.swarm.transfer.base = base_digest(frozen_tensors(
                self.model, [p for p in self.model.parameters() if p.requires_grad]))
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.inner.weight_decay), lr=cfg.inner.lr,
            betas=(cfg.inner.beta1, cfg.inner.beta2), fused=False, foreach=False)
        # names this world (heal mode: the world since its last formation, the same for joiners)
        self.world_id = getattr(self.groups.world, "world_id", "") or \
            self.groups.world.all_gather_object(secrets.token_hex(4))[0]
        self.diloco, self.ddp = wrap_model(cfg, world, self.built, self.optimizer, self.groups.outer)
        self.state = WorkerState(cfg, worker, world.num_workers, self.model, self.optimizer,
                                 batches, self.diloco)
        self.rounds = RoundClock(cfg, self.groups.outer, self.state.totals)  # when rounds end (docs/uneven.md)
        self.slowdown = Slowdown(cfg.run.slowdown, worker)
        if self.diloco is not None and self.diloco.joined is not None:
            self.follow_adoption()  # joined a running swarm: its state, its step
            self.state.record_boundary()
        # Seconds of this process (not restored on resume): inner steps, and the whole loop.
        self.compute_seconds = 0.0
        self.loop_seconds = 0.0
        self.stopper = GracefulStop()

        self.metrics, port = open_metrics(cfg, world, worker)
        self.counts.attach(self.metrics.count)
        restore_cfg = cfg
        if self.built.base_from:  # init_from was the adapters' frozen base, loaded by build_model
            restore_cfg = copy.deepcopy(cfg)
            restore_cfg.checkpoint.init_from = ""
        self.checkpoints = Checkpoints(restore_cfg, world, self.groups.world, self.state, self.metrics,
                                       self.world_id)
        synced = self.diloco.numel if self.diloco else self.model.num_params()
        self.report = RunReport(cfg, world, self.metrics, self.world_id, self.state, synced,
                                self.groups.swarm, self.start_time)
        self.report.start(self.model.num_params(), shard, num_shards, port,
                          joined=self.diloco is not None and self.diloco.joined is not None)
        self.publisher = Publisher(cfg, self.state, self.model) if cfg.publish.every and world.is_leader else None
        self.failover = Failover(cfg, self.groups.world, world, self.state, self.checkpoints, self.metrics) \
            if cfg.run.failover == "heal" else None

    def follow_adoption(self) -> None:
        """The one place where the loop's inner step is rewritten from outside the loop.

        DiLoCo took a swarm's newer global state instead of applying its own round (it
        joined a running swarm, fell behind, or a confirm handed back the majority's
        state): its θ and counters jumped to the swarm's. The loop continues at DiLoCo's
        inner step, so the LR schedule, the checkpoints and the stop point follow it.
        """
        self.state.inner_step = self.diloco.inner_step
        if getattr(self.state.batches, "feed", None) is not None:  # a watched folder on a swarm
            self.state.batches.adopt(self.groups.swarm.transfer.last_download.get("data"), self.diloco.outer_step)

    def close(self) -> None:
        try:
            self.checkpoints.writer.wait()
        except checkpoint.CheckpointError as e:
            log.error("%s", e)
        self.stopper.uninstall()
        if self.diloco:
            self.diloco.close()
        self.metrics.close()
        self.groups.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(cfg: Config, world: World, built: BuiltModel, optimizer: torch.optim.Optimizer,
               outer_group: Group) -> tuple[DiLoCo | None, nn.Module | None]:
    """DiLoCo around the model (run.mode = diloco; DDP over an island's ranks for its inner
    steps), or plain DDP over the world (run.mode = ddp with several processes)."""
    diloco, ddp = None, None
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    if cfg.run.mode == "diloco":
        make, model, group = DiLoCo, built.model, outer_group
        if cfg.run.shard == "fsdp":  # θ per chunk, exchanged per chunk (dilo/sharded_state.py)
            intra = world.island.intra_pg
            make = partial(ShardedDiLoCo, intra_pg=intra)
            group = ShardedGroup(outer_group.inter, intra)
        diloco = make(model, optimizer, inner_steps=cfg.outer.inner_steps,
                        outer_lr=cfg.outer.lr, outer_momentum=cfg.outer.momentum,
                        nesterov=cfg.outer.nesterov,
                        codec=get_codec(cfg.comm.codec, cfg.comm.block_size, density=cfg.comm.density,
                                        value_bits=cfg.comm.value_bits, sparse_block=cfg.comm.sparse_block,
                                        sparse_exchange=cfg.comm.sparse_exchange),
                        group=group, block_size=cfg.comm.block_size,
                        fragments=cfg.outer.fragments, delay=cfg.outer.delay,
                        alpha=cfg.outer.alpha, overlap=cfg.outer.overlap,
                        error_feedback=cfg.comm.error_feedback, ef_decay=cfg.comm.ef_decay,
                        owner_feedback=cfg.comm.owner_feedback,
                        aggregate=cfg.outer.aggregate,
                        trim=cfg.outer.trim, clip_ratio=cfg.outer.clip_ratio, weighting=cfg.outer.weighting,
                        digest=cfg.outer.digest)
        attach_aggregation(built, cfg, diloco)
        if world.island and cfg.run.shard == "ddp":  # inner steps: data-parallel over the worker's own ranks only
            ddp = DistributedDataParallel(built.model, device_ids=device_ids,
                                          process_group=world.island.intra_pg)
    elif world.world_size > 1:
        ddp = DistributedDataParallel(built.model, device_ids=device_ids)
    return diloco, ddp
