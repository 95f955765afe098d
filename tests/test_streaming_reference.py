"""Streaming DiLoCo, delayed and eager outer steps against an independent reference.

The reference below is written from docs/design.md (the algorithm) and docs/streaming.md with plain torch
(AdamW per worker, exact means, one torch.optim.SGD(nesterov=True) per fragment) and
never calls dilo. dilo runs the same workers on the threads backend with the fp32 codec.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.comm.local import local_groups
from tests.helpers import Net, adamw, inner_step, run_workers

WORKERS, H, STEPS = 3, 4, 22  # 22: the run ends mid-round, so the final drain is exercised too
OUTER_LR, MOMENTUM = 0.7, 0.9


# Fragments written out by hand from the rule: block i -> i mod P; embedding -> 0; head -> P-1.
FRAGMENTS = {
    1: [["emb", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]],
    2: [["emb", "blocks.0", "blocks.2"], ["blocks.1", "blocks.3", "head"]],
}


def fragment_params(model: nn.Module, num_fragments: int) -> list[list[torch.Tensor]]:
    groups = []
    for prefixes in FRAGMENTS[num_fragments]:
        groups.append([p for name, p in model.named_parameters()
                       if any(name.startswith(prefix + ".") for prefix in prefixes)])
    return groups


def sgd(params):
    return torch.optim.SGD(params, lr=OUTER_LR, momentum=MOMENTUM, nesterov=True)


@functools.lru_cache(maxsize=None)  # deterministic; shared by the tests below (not mutated)
def reference(P: int, tau: int, alpha: float, overlap: str):
    """Global parameters after every outer step of the loop, and after the final drain
    (when every worker's live parameters equal them)."""
    glob = Net()
    glob_frags = fragment_params(glob, P)
    glob_opts = [sgd(ps) for ps in glob_frags]
    models = [copy.deepcopy(glob) for _ in range(WORKERS)]
    opts = [adamw(m) for m in models]
    live = [fragment_params(m, P) for m in models]
    # eager: each worker's own outer copy, stepped with the fresh own Δ for the stale own share
    eager_models = [copy.deepcopy(glob) for _ in range(WORKERS)]
    eager = [fragment_params(m, P) for m in eager_models]
    eager_opts = [[sgd(ps) for ps in frs] for frs in eager]

    def start_point(w, f):  # where worker w's fragment f was last merged from
        return eager[w][f] if overlap == "eager" else glob_frags[f]

    def due(step):  # the fragment applied at this inner step: (step − p·H/P) mod H == 0
        return next((p for p in range(P) if (step - p * H // P) % H == 0), None)

    in_flight = []  # (fragment, started at, [Δ_w per worker]) in start order
    last_merge, last_snap = [0] * P, [0] * P
    history = []

    def snapshot(f, step):
        deltas = [[(a - b).detach().clone() for a, b in zip(start_point(w, f), live[w][f])]
                  for w in range(WORKERS)]
        in_flight.append((f, step, deltas))
        last_snap[f] = step

    def apply(entry):
        f, _, deltas = entry
        in_flight.remove(entry)
        mean = [torch.stack([d[i] for d in deltas]).mean(0) for i in range(len(glob_frags[f]))]
        for p, g in zip(glob_frags[f], mean):
            p.grad = g
        glob_opts[f].step()
        glob_opts[f].zero_grad()
        history.append([p.detach().clone() for p in glob.parameters()])
        return mean

    @torch.no_grad()
    def merge(f, step):
        for w in range(WORKERS):
            for x, src in zip(live[w][f], start_point(w, f)):
                x.copy_(alpha * x + (1 - alpha) * src)
        last_merge[f] = step

    for step in range(1, STEPS + 1):
        for w in range(WORKERS):
            inner_step(models[w], opts[w], w, step - 1)
        f = due(step + tau)
        if f is not None:
            snapshot(f, step)
        f = due(step)
        if f is None:
            continue
        mine = [e for e in in_flight if e[0] == f]
        fresh = next(e for e in mine if e[1] == step - tau)
        if overlap == "none":
            apply(fresh)
        else:
            previous = next((e for e in mine if e is not fresh), None)
            mean = apply(previous) if previous else None
            if overlap == "eager":
                for w in range(WORKERS):
                    for i, p in enumerate(eager[w][f]):
                        stale = previous[2][w][i] if previous else torch.zeros_like(p)
                        p.grad = (mean[i] if mean else 0) + (fresh[2][w][i] - stale) / WORKERS
                    eager_opts[w][f].step()
                    eager_opts[w][f].zero_grad()
        merge(f, step)

    # end of run: unsent progress goes out, everything in flight is applied, live ← θ
    for f in range(P):
        if last_snap[f] <= last_merge[f] < STEPS:
            snapshot(f, STEPS)
    regular = list(history)
    while in_flight:
        apply(in_flight[0])
    return regular, history[-1]


def run_dilo(P: int, tau: int, alpha: float, overlap: str, codec: str = "fp32", ef: bool = False):
    groups = local_groups(WORKERS)
    models = [Net() for _ in range(WORKERS)]  # here: torch.manual_seed is global, not per thread

    def worker(rank: int):
        model = models[rank]
        opt = adamw(model)
        diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                        codec=codec, group=groups[rank], fragments=P, delay=tau, alpha=alpha,
                        overlap=overlap, error_feedback=ef)
        history, hashes = [], []
        try:
            for step in range(STEPS):
                inner_step(model, opt, rank, step)
                stats = diloco.step()
                if stats is not None:
                    history.append(diloco.global_params.detach().clone())
                    hashes.append(stats.global_hash)
            hashes += [s.global_hash for s in diloco.flush()]
        finally:
            diloco.close()
        final_live = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return history, hashes, diloco.global_params.detach().clone(), final_live

    return run_workers(worker, WORKERS)


CASES = [  # (P, τ, α, overlap)
    (2, 1, 0.0, "none"),
    (2, 1, 0.5, "none"),
    (1, 0, 0.0, "delayed"),
    (1, 0, 0.0, "eager"),
    (2, 1, 0.0, "eager"),
    (2, 1, 0.5, "delayed"),
]


@pytest.mark.parametrize("P,tau,alpha,overlap", CASES)
def test_matches_reference(P, tau, alpha, overlap):
    want_history, want_final = reference(P, tau, alpha, overlap)
    flat = [torch.cat([p.reshape(-1) for p in ps]) for ps in [*want_history, want_final]]
    results = run_dilo(P, tau, alpha, overlap)
    for history, hashes, final_global, final_live in results:
        assert len(history) == len(want_history) > 3
        for got, want in zip([*history, final_global], flat):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        assert torch.equal(final_live, final_global)
        assert hashes == results[0][1]


def test_variants_really_differ():
    """Guard against a reference that agrees trivially: each switch changes the trajectory."""
    finals = {case: reference(*case)[1] for case in [(1, 0, 0.0, "none"), *CASES]}
    flat = {case: torch.cat([p.reshape(-1) for p in ps]) for case, ps in finals.items()}
    cases = list(flat)
    for i, a in enumerate(cases):
        for b in cases[i + 1:]:
            assert (flat[a] - flat[b]).abs().max() > 1e-4, (a, b)


@pytest.mark.parametrize("overlap", ["none", "eager"])
def test_lossy_codec_with_error_feedback_stays_bit_identical(overlap):
    results = run_dilo(2, 1, 0.5, overlap, codec="fp4", ef=True)
    for history, hashes, final_global, final_live in results[1:]:
        assert hashes == results[0][1]
        for a, b in zip(history, results[0][0]):
            assert torch.equal(a, b)
        assert torch.equal(final_global, results[0][2]) and torch.equal(final_live, results[0][3])


def paper_eager(steps: int):
    """Eager updates as Kale et al. (2025) state them, per worker, with no global copy: worker w
    keeps its own outer parameters θ_w and its own SGD(Nesterov); after round t it steps θ_w with
    Δ̂_w = Δ_w^(t)/M + (1/M)·Σ_{w'≠w} Δ_{w'}^(t−1) (Δ^(0) = 0) and restarts the round from θ_w.
    Returns every worker's live parameters after each round."""
    models = [Net() for _ in range(WORKERS)]
    opts = [adamw(m) for m in models]
    outer = [Net() for _ in range(WORKERS)]
    outer_opts = [sgd(list(m.parameters())) for m in outer]
    previous = [[torch.zeros_like(p) for p in outer[0].parameters()] for _ in range(WORKERS)]
    rounds = []
    for step in range(1, steps + 1):
        for w in range(WORKERS):
            inner_step(models[w], opts[w], w, step - 1)
        if step % H:
            continue
        deltas = [[(o - x).detach().clone() for o, x in zip(outer[w].parameters(), models[w].parameters())]
                  for w in range(WORKERS)]
        for w in range(WORKERS):
            for i, p in enumerate(outer[w].parameters()):
                others = sum(previous[v][i] for v in range(WORKERS) if v != w)
                p.grad = (deltas[w][i] + others) / WORKERS
            outer_opts[w].step()
            outer_opts[w].zero_grad()
            with torch.no_grad():
                for x, o in zip(models[w].parameters(), outer[w].parameters()):
                    x.copy_(o)
        previous = deltas
        rounds.append([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models])
    return rounds


def test_eager_live_model_follows_the_paper_form():
    """dilo's eager (global θ on the delayed trajectory + a per-worker eager copy stepped with
    Δ^(t−1) + (Δ_m^(t) − Δ_m^(t−1))/M) puts each worker's live model where the paper's per-worker
    algorithm puts it, round after round, with Nesterov momentum 0.9; replicas agree on θ."""
    steps = 5 * H
    want = paper_eager(steps)
    groups = local_groups(WORKERS)
    models = [Net() for _ in range(WORKERS)]

    def worker(rank: int):
        model = models[rank]
        opt = adamw(model)
        diloco = DiLoCo(model, opt, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                        codec="fp32", group=groups[rank], overlap="eager")
        live, hashes = [], []
        try:
            for step in range(1, steps + 1):
                inner_step(model, opt, rank, step - 1)
                stats = diloco.step()
                if stats is not None:
                    hashes.append(stats.global_hash)
                if step % H == 0:
                    live.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        finally:
            diloco.close()
        return live, hashes

    results = run_workers(worker, WORKERS)
    for rank, (live, hashes) in enumerate(results):
        assert len(live) == len(want) == 5 and len(hashes) == 4
        for got, rnd in zip(live, want):
            torch.testing.assert_close(got, rnd[rank], atol=2e-6, rtol=0)
        assert hashes == results[0][1]
    assert not torch.equal(results[0][0][-1], results[1][0][-1])  # the live models do differ per worker
