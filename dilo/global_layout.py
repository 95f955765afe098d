"""θ's layout: the model's parameter order, the fragments' order, and the flat fp32 CPU copy.

DiLoCo keeps θ and the outer momentum as one flat fp32 CPU vector per fragment (its
parameters in model order, dilo/fragments.py). Checkpoints, `init_from`, the global
hash and a swarm's state transfer see them in the model's parameter order instead, so
they do not depend on how the parameters were split. `FragmentLayout` converts between
the two; `flatten_fp32` / `write_flat` are the one way dilo reads a list of tensors
(parameters, buffers) into such a vector and writes one back.
"""

from __future__ import annotations

from typing import Sequence

import torch


def flatten_fp32(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensors` flattened and concatenated into a new fp32 CPU vector (whatever their
    device and dtype; detached)."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


@torch.no_grad()
def write_flat(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` into `tensors` (the inverse of `flatten_fp32`)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class FragmentLayout:
    """Where each synchronized parameter's elements sit: a model-order flat vector ⇄ one
    flat vector per fragment (`owner[i]` is parameter i's fragment)."""

    def __init__(self, params: Sequence[torch.Tensor], owner: Sequence[int], num_fragments: int):
        self.sizes = [p.numel() for p in params]
        self.owner = list(owner)
        self.num_fragments = num_fragments

    def fragment_order(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A model-order flat vector cut into one flat vector per fragment."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.num_fragments)]
        offset = 0
        for n, f in zip(self.sizes, self.owner):
            parts[f].append(flat[offset:offset + n])
            offset += n
        return [torch.cat(x) if x else torch.zeros(0) for x in parts]

    def model_order(self, per_fragment: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat vector per fragment joined into a model-order flat vector."""
        offsets = [0] * self.num_fragments
        parts = []
        for n, f in zip(self.sizes, self.owner):
            parts.append(per_fragment[f][offsets[f]:offsets[f] + n])
            offsets[f] += n
        return torch.cat(parts)

    @torch.no_grad()
    def write_fragments(self, flat: torch.Tensor, per_fragment: Sequence[torch.Tensor]) -> None:
        """Copy a model-order flat vector into the per-fragment vectors, in place."""
        offsets = [0] * self.num_fragments
        src = 0
        for n, f in zip(self.sizes, self.owner):
            per_fragment[f][offsets[f]:offsets[f] + n].copy_(flat[src:src + n])
            offsets[f] += n
            src += n
