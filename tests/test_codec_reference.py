"""DiLoCo with each lossy codec against an independent reference of the two-phase exchange.

The reference never calls dilo's exchange: it uses only the codec's public `encode` and
`decode` (and its `block_size`, which sets the chunking) and does by hand what every
member of the group does together:

1. each member's pseudo-gradient Δ_m (fp32, model order) is zero-padded and cut into one
   chunk per member, each chunk a whole number of codec blocks;
2. the owner of chunk j decodes every member's encoded chunk j, sums them in fp32 in member
   order, divides by the number of members and encodes that mean once;
3. every member decodes the owner's bytes; the chunks, concatenated and cut to length, are
   the average, the gradient of one torch.optim.SGD(nesterov=True) step on the flat θ.

DiLoCo on the in-process group (dilo/comm/local.py) must hold the same θ and outer
momentum, bit for bit, after every outer step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.codecs import get_codec
from dilo.comm.local import local_groups
from tests.helpers import run_workers

H, ROUNDS, WORKERS = 4, 3, 3
OUTER_LR, MOMENTUM = 0.7, 0.9
LOSSY = ["bf16", "fp16", "int8", "fp4"]


def make_model() -> nn.Module:
    # 916 parameters: not a multiple of the 3 members, so chunks are padded
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 32), nn.Tanh(), nn.Linear(32, 20))


def batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4099 * worker + step)
    return torch.randn(8, 7, generator=g) * (worker + 1), torch.randn(8, 20, generator=g)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def inner_step(model: nn.Module, opt: torch.optim.Optimizer, worker: int, step: int) -> None:
    x, y = batch(worker, step)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def load_flat(model: nn.Module, vector: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def two_phase_mean(deltas: list[torch.Tensor], codec, encode_mean: bool = True) -> torch.Tensor:
    """The members' exchange, written out. encode_mean=False skips the owner's encode of the
    mean (a wrong exchange, to show the comparison would notice)."""
    members, numel = len(deltas), deltas[0].numel()
    per_member = -(-numel // members)
    chunk = max(codec.block_size, -(-per_member // codec.block_size) * codec.block_size)
    padded = [torch.cat([d, torch.zeros(chunk * members - numel)]) for d in deltas]
    pieces = []
    for owner in range(members):
        total = torch.zeros(chunk)
        for member in range(members):  # what member sends the owner, decoded by the owner
            part = padded[member][owner * chunk:(owner + 1) * chunk]
            total = total + codec.decode(codec.encode(part), chunk)
        mean = total / members
        pieces.append(codec.decode(codec.encode(mean), chunk) if encode_mean else mean)
    return torch.cat(pieces)[:numel]


def reference(codec_name: str, encode_mean: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(θ, outer momentum) after each outer step, computed without dilo's exchange."""
    codec = get_codec(codec_name)
    global_model = make_model()
    theta = nn.Parameter(flat(global_model), requires_grad=False)
    outer = torch.optim.SGD([theta], lr=OUTER_LR, momentum=MOMENTUM, nesterov=True)
    workers = [copy.deepcopy(global_model) for _ in range(WORKERS)]
    opts = [adamw(m) for m in workers]
    history = []
    for r in range(ROUNDS):
        deltas = []
        for w, (model, opt) in enumerate(zip(workers, opts)):
            load_flat(model, theta.detach())
            for s in range(H):
                inner_step(model, opt, w, r * H + s)
            deltas.append(theta.detach() - flat(model))
        theta.grad = two_phase_mean(deltas, codec, encode_mean)
        outer.step()
        theta.grad = None
        history.append((theta.detach().clone(), outer.state[theta]["momentum_buffer"].clone()))
    return history


def run_dilo(codec_name: str) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per worker: (θ, outer momentum) after each outer step."""
    groups = local_groups(WORKERS)
    models = [make_model() for _ in range(WORKERS)]  # seeding is global: not inside the threads

    def worker(rank: int):
        model = models[rank]
        opt = adamw(model)
        diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                        nesterov=True, codec=codec_name, group=groups[rank])
        seen = []
        for step in range(H * ROUNDS):
            inner_step(model, opt, rank, step)
            if diloco.step() is not None:
                seen.append((diloco.global_params.detach().clone(), diloco.momentum().clone()))
        return seen

    return run_workers(worker, WORKERS)


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codec_matches_the_two_phase_reference_bit_for_bit(codec):
    expected = reference(codec)
    for rank, seen in enumerate(run_dilo(codec)):
        assert len(seen) == ROUNDS
        for r, ((theta, momentum), (want_theta, want_momentum)) in enumerate(zip(seen, expected)):
            assert torch.equal(theta, want_theta), f"{codec}: θ of worker {rank} after outer step {r + 1}"
            assert torch.equal(momentum, want_momentum), f"{codec}: momentum of worker {rank}, step {r + 1}"


@pytest.mark.parametrize("codec", LOSSY)
def test_the_comparison_notices_a_wrong_exchange(codec):
    """Guards against a reference that agrees trivially: the codec changes θ, and an
    exchange that skips the owner's encode of the mean gives other bits."""
    right, exact, wrong = reference(codec), reference("fp32"), reference(codec, encode_mean=False)
    assert not torch.equal(right[-1][0], exact[-1][0])
    assert not torch.equal(right[-1][0], wrong[-1][0])
