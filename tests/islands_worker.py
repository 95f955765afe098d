"""One process of the islands test: 2 workers x 2 ranks under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc-per-node 4 -m tests.islands_worker OUT_DIR

Runs DiLoCo with a HierarchicalGroup (DDP inside each worker) in three settings and
saves what it saw to OUT_DIR/rank-<rank>.pt; tests/test_islands.py checks it against a
plain-torch reference. The model and data helpers are shared with that reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

WORKER_SIZE, H, ROUNDS = 2, 3, 3
OUTER_LR, MOMENTUM, BLOCK = 0.7, 0.9, 64
# (name, sliced, codec): sliced = every rank exchanges a slice; else local rank 0 exchanges all
RUNS = [("sliced_fp32", True, "fp32"), ("leader_fp32", False, "fp32"), ("sliced_int8", True, "int8")]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))


def batch(worker: int, rank_in_worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * worker + 100 * rank_in_worker + step)
    return torch.randn(4, 16, generator=g) * (worker + 1), torch.randn(4, 16, generator=g)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def run(island, sliced: bool, codec: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from dilo import DiLoCo
    from dilo.comm.hierarchical import HierarchicalGroup
    from dilo.comm.torch_dist import TorchGroup

    model = make_model()
    opt = adamw(model)
    talks = sliced or island.rank_in_worker == 0
    group = HierarchicalGroup(TorchGroup(island.slice_pg) if talks else None, island.intra_pg, sliced)
    diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                    nesterov=True, codec=codec, group=group, block_size=BLOCK)
    ddp = DistributedDataParallel(model, process_group=island.intra_pg)
    out = {"theta": [], "model": [], "hash": [], "sent": [], "received": [], "intra": [], "peers": [],
           "group": (group.rank, group.size)}
    for step in range(H * ROUNDS):
        x, y = batch(island.worker, island.rank_in_worker, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        stats = diloco.step()
        if stats is not None:
            out["theta"].append(diloco.global_params.detach().clone())
            out["model"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            out["hash"].append(stats.global_hash)
            out["sent"].append(stats.bytes_sent)
            out["received"].append(stats.bytes_received)
            out["intra"].append(stats.intra_bytes)
            out["peers"].append(stats.num_peers)
    out["gathered"] = group.all_gather_object(dist.get_rank())
    return out


def misbuilt(island) -> str | None:
    """A sliced composition where local rank 1 forgot its inter group: every rank must refuse."""
    from dilo.comm.hierarchical import HierarchicalGroup
    from dilo.comm.torch_dist import TorchGroup

    inter = TorchGroup(island.slice_pg) if island.rank_in_worker == 0 else None
    try:
        HierarchicalGroup(inter, island.intra_pg, sliced=True)
    except ValueError as e:
        return str(e)
    return None


def main(out_dir: Path) -> None:
    from dilo.codecs import get_codec
    from dilo.comm.hierarchical import join_islands
    from dilo.comm.torch_dist import TorchGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        island = join_islands(WORKER_SIZE)
        results = {name: run(island, sliced, codec) for name, sliced, codec in RUNS}
        # What a worker of one process sends for the same vector among the same 2 workers.
        numel = results["sliced_fp32"]["theta"][0].numel()
        flat = TorchGroup(island.slice_pg)
        results["one_process_bytes"] = {
            codec: flat.average(torch.ones(numel), get_codec(codec, BLOCK)).bytes_sent
            for codec in ("fp32", "int8")}
        results["island"] = (island.worker, island.rank_in_worker, island.num_workers)
        results["misbuilt"] = misbuilt(island)
        torch.save(results, out_dir / f"rank-{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
