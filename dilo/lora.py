"""LoRA adapters for dilo's GPT, and how DiLoCo aggregates adapters (these, or peft's layers
of a Hugging Face model seen through dilo/hf_model.py's PeftAdapter; docs/adapters.md).

`add_lora(model, ...)` wraps the chosen linear layers: y = W x + b + s·B A x with
s = alpha / rank, A (rank × in) and B (out × rank). The base W, b and every other
parameter are frozen, so DiLoCo synchronizes the adapters only: bytes per exchange
scale with the adapters, not the model.

`outer.lora_aggregate` says how the workers' adapters become the global model's:

* `naive`: DiLoCo as for any parameters: the outer step on A and B with the mean of
  their pseudo-gradients. Inexact: mean_i(B_i A_i) ≠ mean(B) mean(A).
* `frozen_a`: A is drawn from the run's seed (the same on every worker) and never
  trained or exchanged; only B is. mean_i(B_i A) = mean(B) A: exact by construction.
* `exact`: as naive, plus after every outer step each worker receives every worker's
  adapters (all-gather, fp32, member order) and folds into the frozen base the part of
  the effective-weight step that the adapter step cannot represent (`exact_residual`).
  Statement: W ← W + η (W̄ − W) + s (B′A′ − B_sgd A_sgd), where W = W_base + s B A is
  the global effective weight before the step, W̄ = mean_i (W_base + s B_i A_i) the
  workers' mean, (A′, B′) the adapters after the outer optimizer's step, and
  (A_sgd, B_sgd) = (A − η(A − Ā), B − η(B − B̄)) their plain-SGD step. With outer
  momentum 0 and a lossless codec this is exactly full-parameter DiLoCo's outer step
  on the effective weights (up to float rounding); with Nesterov momentum the adapters
  keep their own momentum, the residual is applied at rate η without momentum.
"""

from __future__ import annotations

import math

import blake3
import torch
import torch.nn as nn
import torch.nn.functional as F

from dilo.comm.protocol import DivergenceError, Group
from dilo.config_checks import LORA_AGGREGATES, LORA_TARGETS

class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias (same names, so checkpoints of the base load
    into it) plus the trainable low-rank update s·B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator,
                 train_a: bool = True):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        a = torch.empty(rank, base.in_features)
        # peft's initialisation: A ~ kaiming-uniform(a=√5), B = 0 (the adapted model starts as the base)
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(a.to(dev, dtype), requires_grad=train_a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W + s·B A (fp32)."""
        return self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], aggregate: str,
             seed: int) -> list[LoRALinear]:
    """Freeze `model` and wrap the `targets` linears of its blocks (`model.blocks`) with
    adapters; A from `seed` (the same on every worker). frozen_a leaves A untrained."""
    if rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1 to add adapters, got {rank}")
    if aggregate not in LORA_AGGREGATES:
        raise ValueError(f"outer.lora_aggregate must be one of {', '.join(LORA_AGGREGATES)}, got {aggregate!r}")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if not targets or bad:
        raise ValueError(f"model.lora_targets must be a subset of {', '.join(LORA_TARGETS)}; got {targets}")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for block in model.blocks:
        for name in targets:
            layer = LoRALinear(getattr(block, name), rank, alpha, generator, train_a=aggregate != "frozen_a")
            setattr(block, name, layer)
            layers.append(layer)
    return layers


def base_digest(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE3 over the names and bytes of the frozen tensors (the base an adapter run trains on)."""
    h = blake3.blake3()
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def with_base(digest: str, tensors: dict[str, torch.Tensor]) -> str:
    """A LoRA run's global hash: DiLoCo's digest (θ = the adapters, momentum, step) and the
    base's, so replicas whose bases differ never report the same hash."""
    return blake3.blake3(f"{digest}:{base_digest(tensors)}".encode()).hexdigest()


def check_same_base(tensors: dict[str, torch.Tensor], group: Group) -> None:
    """Every member of a fixed group holds the same base (a collective); ValueError otherwise."""
    found = group.all_gather_object(base_digest(tensors))
    if len(set(found)) > 1:
        raise ValueError("the workers' LoRA bases differ (base digests by member: " +
                         ", ".join(d[:12] for d in found) + "); give every worker the same "
                         "checkpoint.init_from")


def adapter_numel(layers: list[LoRALinear]) -> int:
    """Trainable adapter elements (what one exchange carries)."""
    return sum(p.numel() for layer in layers for p in (layer.lora_a, layer.lora_b) if p.requires_grad)


class ExactAggregation:
    """outer.lora_aggregate = exact: DiLoCo's post-outer-step hook (see the module docstring).

    Called on every member after the outer step, before the live model is reset to θ: the
    live adapters are still this worker's trained (A_i, B_i). All members gather the same
    bytes in member order and compute the same residuals with the same operations, so the
    bases stay bit-identical (tests/test_lora.py checks it); θ (the adapters) and its hash
    are DiLoCo's as usual. A fixed group only: a swarm's adopted state carries θ, not bases.
    """

    def __init__(self, layers: list[LoRALinear], params: list[nn.Parameter], group: Group, outer_lr: float):
        if group.open_membership:
            raise ValueError("outer.lora_aggregate = exact needs a fixed group (comm.backend = torch): a "
                             "swarm's members come and go, and an adopted state carries θ, not the bases")
        self.layers, self.params, self.group, self.outer_lr = layers, params, group, outer_lr
        offsets, at = {}, 0
        for p in params:
            offsets[id(p)] = (at, p.shape)
            at += p.numel()
        self.numel = at
        missing = [i for i, layer in enumerate(layers)
                   if id(layer.lora_a) not in offsets or id(layer.lora_b) not in offsets]
        if missing:
            raise ValueError("outer.lora_aggregate = exact needs A and B of every adapter trainable")
        self.slices = [(offsets[id(layer.lora_a)], offsets[id(layer.lora_b)]) for layer in layers]

    @staticmethod
    def _view(flat: torch.Tensor, where: tuple[int, torch.Size]) -> torch.Tensor:
        at, shape = where
        return flat[at:at + shape.numel()].view(shape).double()

    @torch.no_grad()
    def __call__(self, before: torch.Tensor, after: torch.Tensor) -> tuple[int, int]:
        """Fold the residuals into the bases; returns (bytes sent, bytes received)."""
        own = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
        bases = base_digest({str(i): layer.weight for i, layer in enumerate(self.layers)})
        everyone = self.group.all_gather_object((own, bases))  # the folded bases so far are compared too
        if len({b for _, b in everyone}) > 1:
            raise DivergenceError("outer.lora_aggregate = exact: the workers' folded bases differ "
                                  f"({', '.join(b[:12] for _, b in everyone)})")
        gathered = [g for g, _ in everyone]
        members = len(gathered)
        for layer, (at_a, at_b) in zip(self.layers, self.slices):
            a0, b0 = self._view(before, at_a), self._view(before, at_b)
            a_i = [self._view(g, at_a) for g in gathered]
            b_i = [self._view(g, at_b) for g in gathered]
            residual = exact_residual(a0, b0, a_i, b_i, self.outer_lr) * layer.scale
            layer.weight.add_(residual.to(layer.weight.dtype).to(layer.weight.device))
        wire = 4 * self.numel * (members - 1)
        return wire, wire


def exact_residual(a0: torch.Tensor, b0: torch.Tensor, a_i: list[torch.Tensor], b_i: list[torch.Tensor],
                   lr: float) -> torch.Tensor:
    """(1 − η) B A + η mean_i(B_i A_i) − B_sgd A_sgd, the part of the outer SGD step on the
    product that the SGD step on the factors misses (sums in member order)."""
    m = len(a_i)
    mean_prod = sum(b @ a for a, b in zip(a_i, b_i)) / m
    mean_a, mean_b = sum(a_i) / m, sum(b_i) / m
    a_sgd, b_sgd = a0 - lr * (a0 - mean_a), b0 - lr * (b0 - mean_b)
    return (1.0 - lr) * (b0 @ a0) + lr * mean_prod - b_sgd @ a_sgd
