"""Sharded workers: FSDP2 inside an island, DiLoCo's outer state sharded with it.

With `run.shard = fsdp` (docs/islands.md, "Sharded workers") the S ranks of a worker
`fully_shard` the model over the worker's own process group: each rank holds dim-0 chunk
r of every parameter (torch.chunk's cut, FSDP2's default), its inner AdamW steps only
that chunk, and FSDP all-gathers the weights for forward/backward and reduce-scatters the
gradients (mean over the worker's ranks, as DDP's).

DiLoCo is not told either: it runs on `LocalShards`, a module whose parameters are
this rank's chunks (aliases of FSDP's sharded storage, so writing θ into them writes the
model), with a `ShardedGroup` (dilo/comm/sharded.py) that averages the chunk with local
rank r of every other worker and nothing else. So each rank's θ, outer momentum and
error-feedback residual cover its own chunks only (host memory per rank ÷ S), and the
outer step writes θ straight into the local shards: no all-gather inside the worker.

The global hash is over the whole state: each rank digests its chunk (θ, momentum, outer
step: `state_digest`), the worker's ranks all-gather those digests, and the global hash is
sha256 over them in local-rank order. It is the same on every rank of every worker when
every chunk is bit-identical across workers, and `Group.confirm` compares it over every
process. (It depends on S: the hashes of a DDP island and of a sharded one differ even for
the same θ.)
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from dilo.diloco import DiLoCo


def shard_model(model: nn.Module, intra_pg: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """`fully_shard` every block of `model.blocks` (if any), then the root, over the worker's
    ranks (`intra_pg`); returns the same module, now holding DTensor shards."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(intra_pg, device.type)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_chunk(full: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Chunk `index` of `parts` along dim 0, as FSDP2 cuts it (`torch.chunk`; chunks past
    the last non-empty one are empty)."""
    chunks = torch.chunk(full, parts, dim=0)
    if index < len(chunks):
        return chunks[index]
    return full.new_empty((0, *full.shape[1:]))


class LocalShards(nn.Module):
    """This rank's chunk of every trainable parameter of an FSDP2 model, as parameters
    that share storage with the model's shards (what DiLoCo synchronises)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names: list[str] = []
        shards = []
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                local = p.to_local() if hasattr(p, "to_local") else p
                shards.append(nn.Parameter(local, requires_grad=True))  # same storage
                self.names.append(name)
        self.shards = nn.ParameterList(shards)


class ShardedDiLoCo(DiLoCo):
    """DiLoCo over this rank's chunks (`LocalShards`), its global hash over the worker's chunks."""

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, intra_pg: dist.ProcessGroup,
                 **kwargs):
        self.intra_pg = intra_pg
        self._hash_cache: tuple[str, str] | None = None
        self.full_model = model
        super().__init__(LocalShards(model), inner_optimizer, **kwargs)

    def _whole_digest(self, local: str) -> str:
        """sha256 over every rank's digest of its chunk (`_local_digest`: θ, the outer momentum
        and the outer step), in local-rank order: a collective over the worker's ranks, unless
        this rank's digest is unchanged since the last call."""
        if self._hash_cache is not None and self._hash_cache[0] == local:
            return self._hash_cache[1]
        digests: list = [None] * dist.get_world_size(self.intra_pg)
        dist.all_gather_object(digests, local, group=self.intra_pg)
        whole = hashlib.sha256("".join(digests).encode()).hexdigest()
        self._hash_cache = (local, whole)
        return whole

