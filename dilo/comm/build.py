"""The one factory of groups: the swarm peer, the world group and DiLoCo's outer Group.

The only place outside dilo/comm that knows which backends exist. The trainer asks for
`build_groups(cfg, world, count)` and gets a `Groups`; it never builds process groups.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch.distributed as dist

from dilo.comm.hierarchical import HierarchicalGroup, join_islands
from dilo.comm.protocol import Group, SoloGroup
from dilo.comm.torch_dist import TorchGroup
from dilo.config import Config

if TYPE_CHECKING:
    from dilo.comm.swarm import SwarmGroup
    from dilo.world import World


@dataclass
class Groups:
    world: Group
    """Every process of this torchrun world (resume, stop requests); a swarm peer is a
    world of its own."""
    outer: Group | None
    """Who DiLoCo averages with, every worker as one member (None in run.mode = ddp)."""
    swarm: SwarmGroup | None
    """The swarm peer (comm.backend = hivemind, on the worker's rank 0 only)."""

    def close(self) -> None:
        if self.swarm is not None:
            self.swarm.close()


def swarm_group_class() -> type:
    """`SwarmGroup`, or a ValueError saying how to install the hivemind extra."""
    try:
        from dilo.comm.swarm import SwarmGroup
    except ImportError as e:  # dilo.comm.swarm raises it (name="hivemind") before importing hivemind
        if (e.name or "").split(".")[0] != "hivemind":
            raise
        raise ValueError("comm.backend = hivemind needs the swarm extra: pip install -e '.[swarm]'") from None
    return SwarmGroup


def build_groups(cfg: Config, world: World, count: Callable[..., None]) -> Groups:
    """Every group this process needs; `count(name, value=1.0, **labels)` receives the
    swarm's counter events. A collective: every rank calls it, in the same order."""
    if cfg.run.failover == "heal":  # every worker a process of its own, in a group that heals
        from dilo.comm.heal import connect

        group = connect(cfg, world)
        return Groups(group, group, None)
    swarm = None
    # A swarm peer is one worker; under torchrun (run.worker_size = world size) only
    # its rank 0 joins the swarm, the other ranks get everything through the island.
    if cfg.comm.backend == "hivemind" and world.rank == 0:
        swarm = swarm_group_class().from_config(cfg, count=count)
    try:
        world_group = TorchGroup() if world.world_size > 1 else SoloGroup()
        outer = _outer_group(cfg, world, swarm) if cfg.run.mode == "diloco" else None
    except BaseException:
        if swarm is not None:
            swarm.close()
        raise
    return Groups(world_group, outer, swarm)


def worker_identity(cfg: Config, world: World, swarm: SwarmGroup | None) -> tuple[int | str, int, int]:
    """(worker name, data shard, number of shards): the rank's worker and shard under
    torchrun; a swarm has no ranks, so each peer names itself and picks a shard of its
    own. A collective on the worker's island (its other ranks learn name and shard)."""
    if cfg.run.failover == "heal":  # named by slot; the data shard follows the group's ranks
        return cfg.run.slot, world.data_shard, world.num_workers
    if cfg.comm.backend != "hivemind":
        return world.worker, world.worker, world.num_workers
    num_shards = cfg.peers.num_shards
    peer = None
    if swarm is not None:
        peer = (swarm.label, cfg.peers.shard if cfg.peers.shard >= 0 else swarm.data_shard(num_shards))
    if world.island is not None:
        everyone: list = [None] * world.worker_size
        dist.all_gather_object(everyone, peer, group=world.island.intra_pg)
        peer = everyone[0]
    return peer[0], peer[1], num_shards


def _outer_group(cfg: Config, world: World, swarm: SwarmGroup | None) -> Group:
    overlapped = cfg.outer.delay > 0 or cfg.outer.overlap != "none"
    if cfg.comm.backend == "hivemind":
        if world.island is None:
            return swarm
        if not overlapped:
            return HierarchicalGroup(swarm, world.island.intra_pg, sliced=False)
        # Exchanges on a second set; the swarm's confirm runs on the training thread, on the
        # first set's intra group, between DDP's collectives (the same thread: never interleaved).
        island = join_islands(world.worker_size)
        return HierarchicalGroup(swarm, island.intra_pg, sliced=False, confirm_pg=world.island.intra_pg)
    # DiLoCo's process groups are its own (created here by every rank, in the same
    # order): with outer.delay or outer.overlap its collectives run on a background
    # thread, and collectives on one group must never interleave between threads
    # (dilo/overlap.py); the default group stays free for resume and stop requests,
    # the island's intra group for DDP.
    if world.island is None:
        if world.world_size == 1:
            return SoloGroup()
        timeout = datetime.timedelta(seconds=cfg.comm.timeout)
        return TorchGroup(dist.new_group(backend="gloo", timeout=timeout), pieces=cfg.comm.pieces)
    island = world.island
    if overlapped:
        island = join_islands(world.worker_size)  # a second set: DDP keeps the first
    # Local rank r exchanges slice r with local rank r of every other worker.
    inter = TorchGroup(island.slice_pg, pieces=cfg.comm.pieces) if world.num_workers > 1 else SoloGroup()
    return HierarchicalGroup(inter, island.intra_pg)
