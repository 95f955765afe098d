"""DiLoCo's update against an independent reference: plain AdamW per worker, the mean of
the pseudo-gradients, and torch.optim.SGD(nesterov=True) on the global copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.comm.local import local_groups
from tests.helpers import run_workers

H, ROUNDS, WORKERS = 4, 3, 3
OUTER_LR, MOMENTUM = 0.7, 0.9


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def inner_step(model: nn.Module, opt: torch.optim.Optimizer, worker: int, step: int) -> None:
    x, y = batch(worker, step)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def reference() -> list[list[torch.Tensor]]:
    """Global parameters after each round, computed without dilo."""
    global_model = make_model()
    outer = torch.optim.SGD(global_model.parameters(), lr=OUTER_LR, momentum=MOMENTUM, nesterov=True)
    workers = [copy.deepcopy(global_model) for _ in range(WORKERS)]
    opts = [adamw(m) for m in workers]
    history = []
    for r in range(ROUNDS):
        deltas = []
        for w, (model, opt) in enumerate(zip(workers, opts)):
            model.load_state_dict(global_model.state_dict())
            for s in range(H):
                inner_step(model, opt, w, r * H + s)
            deltas.append([g.detach() - p.detach() for g, p in zip(global_model.parameters(), model.parameters())])
        for i, g in enumerate(global_model.parameters()):
            g.grad = torch.stack([d[i] for d in deltas]).mean(0)
        outer.step()
        outer.zero_grad()
        history.append([p.detach().clone() for p in global_model.parameters()])
    return history


def run_dilo(codec: str = "fp32", perturb_init: bool = False):
    groups = local_groups(WORKERS)
    models = [make_model() for _ in range(WORKERS)]  # seeding is global: not inside the threads

    def worker(rank: int):
        model = models[rank]
        if perturb_init and rank > 0:  # DiLoCo must adopt worker 0's θ at start
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        opt = adamw(model)
        diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                        nesterov=True, codec=codec, group=groups[rank])
        params, hashes = [], []
        for step in range(H * ROUNDS):
            inner_step(model, opt, rank, step)
            stats = diloco.step()
            if (step + 1) % H == 0:
                assert stats is not None and stats.outer_step == (step + 1) // H
                params.append([p.detach().clone() for p in model.parameters()])
                hashes.append(stats.global_hash)
            else:
                assert stats is None
        return params, hashes

    return run_workers(worker, WORKERS)


@pytest.mark.parametrize("perturb_init", [False, True])
def test_matches_reference(perturb_init):
    expected = reference()
    for params, hashes in run_dilo("fp32", perturb_init):
        for r in range(ROUNDS):
            for got, want in zip(params[r], expected[r]):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_model_moves_each_round():
    """Guard against a reference that trivially agrees (e.g. nothing updates)."""
    expected = reference()
    start = [p.detach() for p in make_model().parameters()]
    for r in range(ROUNDS):
        assert max((a - b).abs().max().item() for a, b in zip(expected[r], start)) > 1e-3
        start = expected[r]


@pytest.mark.parametrize("codec", ["fp32", "bf16", "fp16", "int8", "fp4"])
def test_replicas_bit_identical(codec):
    results = run_dilo(codec)
    for r in range(ROUNDS):
        assert len({hashes[r] for _, hashes in results}) == 1
        first = results[0][0][r]
        for params, _ in results[1:]:
            for a, b in zip(params[r], first):
                assert torch.equal(a, b)


def test_only_trainable_params_sync_and_buffers_average():
    """Frozen parameters stay out of θ; floating-point buffers (BatchNorm's running stats)
    end as the mean of what the workers held when they exchanged, the same on every worker."""
    groups = local_groups(2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))

    def worker(rank: int):
        model = models[rank]
        model[0].weight.requires_grad_(False)
        frozen_before = model[0].weight.detach().clone()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        diloco = DiLoCo(model, opt, inner_steps=2, codec="fp32", group=groups[rank])
        assert diloco.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x = torch.randn(16, 4, generator=g) * (rank + 1)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            # what this worker holds when the exchange (at the 2nd step) takes its buffers
            own = (model[1].running_mean.clone(), model[1].running_var.clone())
            diloco.step()
        assert torch.equal(model[0].weight, frozen_before)
        return own, (model[1].running_mean.clone(), model[1].running_var.clone())

    (own0, after0), (own1, after1) = run_workers(worker, 2)
    for i, name in enumerate(["running_mean", "running_var"]):
        assert not torch.equal(own0[i], own1[i]), f"{name}: the workers' buffers must differ to test the mean"
        mean = (own0[i] + own1[i]) / 2  # fp32, member order: what the exact exchange computes
        assert torch.equal(after0[i], mean), f"{name} of worker 0 is not the mean"
        assert torch.equal(after1[i], mean), f"{name} of worker 1 is not the mean"
