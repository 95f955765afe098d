"""Process identity: who this process is in the run, before anything is built.

torchrun (or a plain `python -m dilo.train`, a world of one) decides the ranks; a worker
is `run.worker_size` consecutive ranks (docs/islands.md) and its rank 0 speaks for it
(summary, checkpoint, metrics-<worker>.jsonl). This module joins the default process
group, the islands of a worker, picks the device and the number of threads, and sets up
logging; it builds no DiLoCo group (that is dilo/comm/build.py).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dilo.comm.hierarchical import Island, join_islands
from dilo.comm.torch_dist import init_default_group, launched_by_torchrun
from dilo.config import Config, validate_world_size


@dataclass
class World:
    world_size: int
    """Processes of this torchrun world (1 without torchrun)."""
    rank: int
    local_rank: int
    worker_size: int
    worker: int
    """This process's worker (a swarm peer replaces it by its name: dilo/train.py)."""
    rank_in_worker: int
    num_workers: int
    device: torch.device
    island: Island | None
    """The worker's own process groups when worker_size > 1 (DDP inside a worker)."""
    data_shard: int = 0
    """run.failover = heal: this worker's rank in the current group, its data shard (dilo/failover.py
    changes it, `worker` and `num_workers` when the group changes)."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def speaks_for_worker(self) -> bool:
        """The worker's rank 0 writes its summary and checkpoints and runs evaluations."""
        return self.rank_in_worker == 0


def setup_logging(is_leader: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_leader else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = cuda but no CUDA device is visible; use run.device = cpu or auto")
    if use_cuda:
        # More ranks than GPUs on a node (small models, tests): ranks share the GPUs round-robin.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def ranks_share_a_gpu() -> bool:
    """More local ranks than visible GPUs: NCCL refuses two ranks on one device, so gloo it is."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return torch.cuda.is_available() and local_world > torch.cuda.device_count()


def check_run_dir(run_dir: str) -> None:
    """Refuse a run.dir that cannot be created or written, before any rendezvous."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ValueError(f"run.dir {run_dir} is not writable ({e.strerror}); "
                         "choose another --run.dir") from None


def join_world(cfg: Config) -> World:
    """This process's identity; joins the default group and the islands (collectives)."""
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    validate_world_size(cfg, world_size)  # before the rendezvous: every rank refuses alike
    check_run_dir(cfg.run.dir)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        init_default_group(cfg.comm.timeout, device.type == "cuda" and not ranks_share_a_gpu())
    rank = dist.get_rank() if world_size > 1 else 0
    worker, rank_in_worker = divmod(rank, cfg.run.worker_size)
    island = join_islands(cfg.run.worker_size) if cfg.run.worker_size > 1 else None
    setup_logging(rank == 0)
    return World(world_size, rank, local_rank, cfg.run.worker_size, worker, rank_in_worker,
                 world_size // cfg.run.worker_size, device, island)
