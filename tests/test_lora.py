"""LoRA adapters and outer.lora_aggregate (dilo/lora.py, docs/adapters.md), each rule
against a reference written here: the workers' adapters, the mean of the effective
weights W_i = W_base + s·B_i A_i, and the outer Nesterov step done by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from dilo import DiLoCo
from dilo.comm.local import local_groups
from dilo.config import ModelConfig
from dilo.lora import ExactAggregation, adapter_numel, add_lora
from dilo.model import GPT
from tests.helpers import run_workers

H, ROUNDS, WORKERS, RANK, ALPHA = 3, 3, 3, 2, 4.0
CFG = ModelConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2)


def make_model(aggregate: str):
    torch.manual_seed(0)
    model = GPT(CFG)
    layers = add_lora(model, RANK, ALPHA, ["qkv", "fc_out"], aggregate, seed=5)
    return model, layers


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def inner_step(model, opt, worker: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=g)
    model(x, torch.roll(x, -1, 1)).backward()
    opt.step()
    opt.zero_grad()


def adamw(model):
    return torch.optim.AdamW(trainable(model), lr=2e-2, weight_decay=0.0)


def effective(layer, a, b, base):
    return base.double() + layer.scale * (b.double() @ a.double())


def reference(aggregate: str, lr: float, momentum: float) -> list[list[tuple]]:
    """Per round, per adapted layer: (A, B, base) of the global model, computed without DiLoCo."""
    model, layers = make_model(aggregate)
    glob = [(l.lora_a.detach().clone(), l.lora_b.detach().clone(), l.weight.detach().clone()) for l in layers]
    workers = [copy.deepcopy(model) for _ in range(WORKERS)]
    opts = [adamw(w) for w in workers]
    bufs: dict = {}
    history = []
    for r in range(ROUNDS):
        trained = []
        for w, (wm, opt) in enumerate(zip(workers, opts)):
            with torch.no_grad():
                for (a, b, base), wl in zip(glob, [m for m in wm.modules() if hasattr(m, "lora_a")]):
                    wl.lora_a.copy_(a), wl.lora_b.copy_(b), wl.weight.copy_(base)
            for s in range(H):
                inner_step(wm, opt, w, r * H + s)
            trained.append([(m.lora_a.detach().clone(), m.lora_b.detach().clone())
                            for m in wm.modules() if hasattr(m, "lora_a")])
        new = []
        for k, (layer, (a, b, base)) in enumerate(zip(layers, glob)):
            stepped = []
            for j, x in enumerate((a, b)):  # Nesterov SGD by hand on the mean pseudo-gradient
                if aggregate == "frozen_a" and j == 0:
                    stepped.append(x)
                    continue
                grad = torch.stack([x - t[k][j] for t in trained]).mean(0)
                buf = grad.clone() if (k, j) not in bufs else momentum * bufs[(k, j)] + grad
                bufs[(k, j)] = buf
                stepped.append(x - lr * (grad + momentum * buf))
            a2, b2 = stepped
            if aggregate == "exact":
                # W_new = W + η(W̄ − W) + s(B′A′ − B_sgd A_sgd) and W_new = base′ + s B′A′
                w_now = effective(layer, a, b, base)
                w_bar = torch.stack([effective(layer, t[k][0], t[k][1], base) for t in trained]).mean(0)
                a_bar = torch.stack([t[k][0] for t in trained]).double().mean(0)
                b_bar = torch.stack([t[k][1] for t in trained]).double().mean(0)
                a_sgd, b_sgd = a.double() + lr * (a_bar - a.double()), b.double() + lr * (b_bar - b.double())
                base = (w_now + lr * (w_bar - w_now) - layer.scale * (b_sgd @ a_sgd)).float()
            new.append((a2, b2, base))
        glob = new
        history.append(glob)
    return history


def run_dilo(aggregate: str, lr: float, momentum: float, codec: str = "fp32"):
    groups = local_groups(WORKERS)
    built = [make_model(aggregate) for _ in range(WORKERS)]

    def worker(rank: int):
        model, layers = built[rank]
        opt = adamw(model)
        diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=lr, outer_momentum=momentum, nesterov=momentum > 0, codec=codec,
                        group=groups[rank])
        assert diloco.numel == adapter_numel(layers) < model.num_params() // 10
        if aggregate == "exact":
            diloco.after_outer_step = ExactAggregation(layers, diloco.params, groups[rank], lr)
        rounds = []
        for step in range(H * ROUNDS):
            inner_step(model, opt, rank, step)
            stats = diloco.step()
            if stats is not None:
                rounds.append([(l.lora_a.detach().clone(), l.lora_b.detach().clone(), l.weight.detach().clone())
                               for l in layers])
        return rounds

    return run_workers(worker, WORKERS)


@pytest.mark.parametrize("aggregate", ["naive", "frozen_a", "exact"])
def test_rule_matches_reference_and_replicas_agree(aggregate):
    want = reference(aggregate, 0.7, 0.9)
    got = run_dilo(aggregate, 0.7, 0.9)
    for r in range(ROUNDS):
        for rank in range(1, WORKERS):  # bit-identical replicas: adapters and bases
            for x, y in zip(got[rank][r], got[0][r]):
                assert all(torch.equal(u, v) for u, v in zip(x, y))
        for (a, b, base), (ra, rb, rbase) in zip(got[0][r], want[r]):
            torch.testing.assert_close(a, ra, atol=2e-6, rtol=0)
            torch.testing.assert_close(b, rb, atol=2e-6, rtol=0)
            torch.testing.assert_close(base, rbase, atol=2e-6, rtol=0)
    initial = [l.weight.detach() for l in make_model(aggregate)[1]]
    moved = max((base - w).abs().max().item() for (_, _, base), w in zip(got[0][-1], initial))
    assert (moved > 1e-5) == (aggregate == "exact")  # only exact touches the base


def test_exact_is_the_outer_step_on_effective_weights():
    """Momentum 0, lossless codec: exact and frozen_a move W_eff by η(W̄ − W) (full-parameter
    DiLoCo's outer SGD on the effective weights); naive does not (mean(BA) ≠ mean(B)·mean(A))."""
    lr = 0.7
    errors = {}
    for aggregate in ("naive", "frozen_a", "exact"):
        model, layers = make_model(aggregate)
        before = [effective(l, l.lora_a, l.lora_b, l.weight) for l in layers]
        workers = [copy.deepcopy(model) for _ in range(WORKERS)]
        for w, wm in enumerate(workers):
            opt = adamw(wm)
            for s in range(H):
                inner_step(wm, opt, w, s)
        per_worker = [[effective(m, m.lora_a, m.lora_b, m.weight) for m in wm.modules() if hasattr(m, "lora_a")]
                      for wm in workers]
        w_bar = [torch.stack([ws[k] for ws in per_worker]).mean(0) for k in range(len(layers))]
        after = run_dilo(aggregate, lr, 0.0)[0][0]
        errors[aggregate] = max((effective(l, a, b, base) - (w + lr * (wb - w))).abs().max().item()
                                for l, (a, b, base), w, wb in zip(layers, after, before, w_bar))
    assert errors["exact"] < 1e-6 and errors["frozen_a"] < 1e-6, errors
    assert errors["naive"] > 100 * max(errors["exact"], 1e-8), errors


def test_lossy_codec_keeps_replicas_identical():
    got = run_dilo("exact", 0.7, 0.9, codec="int8")
    for rank in range(1, WORKERS):
        for x, y in zip(got[rank][-1], got[0][-1]):
            assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_frozen_a_trains_and_sends_b_only():
    model, layers = make_model("frozen_a")
    assert all(not l.lora_a.requires_grad and l.lora_b.requires_grad for l in layers)
    assert {id(p) for p in trainable(model)} == {id(l.lora_b) for l in layers}
    assert torch.equal(layers[0].lora_a, make_model("frozen_a")[1][0].lora_a)  # same seed, same A


def test_adapted_model_starts_as_the_base():
    torch.manual_seed(0)
    base = GPT(CFG)
    model, _ = make_model("naive")
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"model.lora_rank": -1}, "model.lora_rank"),
    ({"model.lora_rank": 4, "model.lora_targets": "qkv,mlp"}, "model.lora_targets"),
    ({"model.lora_rank": 4, "outer.lora_aggregate": "mean"}, "outer.lora_aggregate"),
    ({"outer.lora_aggregate": "exact"}, "model.lora_rank > 0"),
    ({"model.lora_rank": 4, "outer.lora_aggregate": "exact", "outer.fragments": 2}, "fragments = 1"),
    ({"model.lora_rank": 4, "outer.lora_aggregate": "exact", "comm.backend": "hivemind"}, "comm.backend"),
    ({"model.hf_config": "llama.yaml"}, "config.json"),
])
def test_bad_settings_are_refused(change, message):
    from dilo.config import Config
    from dilo.config_checks import validate

    cfg = Config()
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_exact_refuses_a_swarm():
    model, layers = make_model("exact")
    group = local_groups(1)[0]
    group.open_membership = True
    with pytest.raises(ValueError, match="fixed group"):
        ExactAggregation(layers, trainable(model), group, 0.7)
