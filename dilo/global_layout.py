"""θ's layout: the model's parameter order, the fragments' order, and the flat fp32 CPU copy.

DiLoCo keeps θ and the outer momentum as one flat fp32 CPU vector per fragment (its
parameters in model order, dilo/fragments.py). Checkpoints, `init_from`, the global
hash and a swarm's state transfer see them in the model's parameter order instead, so
they do not depend on how the parameters were split. `FragmentLayout` converts between
the two; `flatten_fp32` / `write_flat` are the one way dilo reads a list of tensors
(parameters, buffers) into such a vector and writes one back.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


def flatten_fp32(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensors` flattened and concatenated into a new fp32 CPU vector (whatever their
    device and dtype; detached)."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


_STAGING_NUMEL = 1 << 22  # 16 MiB of pinned fp32 per staging buffer


@torch.no_grad()
def read_pieces(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, fp32 CPU vector) for consecutive pieces of `tensors` flattened in order.

    A CPU fp32 tensor is yielded as a view (no copy). Others are converted: an accelerator
    tensor is copied piece by piece with `non_blocking=True` into a pinned staging buffer
    (one stream synchronisation per 16 MiB piece, never a synchronous copy into pageable
    memory per parameter). A yielded staging view is valid until the next piece is asked for.
    """
    offset = 0
    staging: torch.Tensor | None = None
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.device.type == "cpu":
            yield offset, flat if flat.dtype == torch.float32 else flat.float()
            offset += flat.numel()
            continue
        if staging is None:
            staging = torch.empty(_STAGING_NUMEL, dtype=torch.float32,
                                  pin_memory=torch.cuda.is_available() and flat.device.type == "cuda")
        for lo in range(0, flat.numel(), _STAGING_NUMEL):
            part = flat[lo:lo + _STAGING_NUMEL]
            dst = staging[:part.numel()]
            dst.copy_(part, non_blocking=True)
            if flat.device.type == "cuda":
                torch.cuda.current_stream(flat.device).synchronize()
            yield offset + lo, dst
        offset += flat.numel()


@torch.no_grad()
def write_flat(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` into `tensors` (the inverse of `flatten_fp32`).

    CUDA tensors are filled from a pinned staging buffer with `non_blocking=True`: one
    stream synchronisation per 16 MiB piece (before the buffer is refilled), not a
    synchronous copy from pageable memory per parameter.
    """
    offset = 0
    staging: torch.Tensor | None = None
    for t in tensors:
        src = flat[offset:offset + t.numel()]
        offset += t.numel()
        if t.device.type != "cuda" or not t.is_contiguous():
            t.copy_(src.view_as(t))
            continue
        if staging is None:
            staging = torch.empty(_STAGING_NUMEL, dtype=torch.float32, pin_memory=True)
        dst = t.view(-1)
        for lo in range(0, src.numel(), _STAGING_NUMEL):
            part = src[lo:lo + _STAGING_NUMEL]
            torch.cuda.current_stream(t.device).synchronize()  # the previous piece has left the buffer
            staging[:part.numel()].copy_(part)
            dst[lo:lo + part.numel()].copy_(staging[:part.numel()], non_blocking=True)
    if staging is not None:
        torch.cuda.synchronize()


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
        return torch.cat(self.model_order_views(per_fragment))

    def model_order_views(self, per_fragment: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of `model_order`'s vector, as views of the per-fragment vectors (no copy)."""
        if self.num_fragments == 1:
            return [per_fragment[0]]
        offsets = [0] * self.num_fragments
        parts = []
        for n, f in zip(self.sizes, self.owner):
            parts.append(per_fragment[f][offsets[f]:offsets[f] + n])
            offsets[f] += n
        return parts

    @torch.no_grad()
    def write_fragments(self, flat: torch.Tensor, per_fragment: Sequence[torch.Tensor]) -> None:
        """Copy a model-order flat vector into the per-fragment vectors, in place."""
        offsets = [0] * self.num_fragments
        src = 0
        for n, f in zip(self.sizes, self.owner):
            per_fragment[f][offsets[f]:offsets[f] + n].copy_(flat[src:src + n])
            offsets[f] += n
            src += n


class GlobalCopy:
    """θ and the outer momentum of every fragment, seen in the model's parameter order (what
    checkpoints, the global hash and a swarm's state transfer hold)."""

    def __init__(self, fragments: Sequence, layout: FragmentLayout):
        self.fragments = fragments
        self.layout = layout

    @property
    def params(self) -> torch.Tensor:
        """θ of every fragment, in the model's parameter order (flat fp32, CPU)."""
        if len(self.fragments) == 1:
            return self.fragments[0].theta
        return self.layout.model_order([f.theta.detach() for f in self.fragments])

    def momentum(self) -> torch.Tensor | None:
        """Outer momentum in model order (zeros for fragments not stepped yet), or None."""
        momenta = [f.momentum() for f in self.fragments]
        if all(m is None for m in momenta):
            return None
        return self.layout.model_order([m if m is not None else torch.zeros(f.numel)
                                        for m, f in zip(momenta, self.fragments)])

    def tensors(self) -> dict[str, torch.Tensor]:
        """θ and the outer momentum (once one exists) in model order: a `GlobalState`'s tensors."""
        tensors = {"params": self.params.detach()}
        momentum = self.momentum()
        if momentum is not None:
            tensors["momentum"] = momentum
        return tensors

    def digest_views(self) -> list[torch.Tensor]:
        """`tensors()`'s vectors as views in the same order, without joining them: hashing these
        in turn hashes the same bytes (the global hash without a model-sized copy)."""
        views = self.layout.model_order_views([f.theta.detach() for f in self.fragments])
        momenta = [f.momentum() for f in self.fragments]
        if any(m is not None for m in momenta):
            views += self.layout.model_order_views([m if m is not None else torch.zeros(f.numel)
                                                    for m, f in zip(momenta, self.fragments)])
        return views

    def write_params(self, flat: torch.Tensor) -> None:
        """Every θ_p ← its part of a model-order flat vector."""
        self.layout.write_fragments(flat, [f.theta for f in self.fragments])

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """θ and the outer momenta ← another member's (`tensors()` of its copy)."""
        self.write_params(tensors["params"])
        momenta = self.layout.fragment_order(tensors["momentum"]) if "momentum" in tensors else None
        for i, frag in enumerate(self.fragments):
            frag.set_momentum(momenta[i] if momenta is not None else None)
