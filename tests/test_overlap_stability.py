"""The stability bound behind the overlap warning (dilo/options.py, docs/streaming.md).

The reference builds the outer iteration's 3×3 matrix (error now, error one round ago,
momentum buffer) for one direction of a quadratic and takes its spectral radius with
numpy, independently of the closed-form Jury test that dilo uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dilo.options import overlap_max_stable_lr, overlap_warning


def spectral_radius(lr: float, c: float, mu: float, nesterov: bool, fresh: float) -> float:
    """g = c·(fresh·e_t + (1 − fresh)·e_{t−1}); b ← μ·b + g; e ← e − lr·(g + μ·b) (Nesterov) or e − lr·b."""
    g = np.array([fresh * c, (1 - fresh) * c, 0.0])
    b = g + np.array([0.0, 0.0, mu])
    step = g + mu * b if nesterov else b
    a = np.stack([np.array([1.0, 0.0, 0.0]) - lr * step, [1.0, 0.0, 0.0], b])
    return float(max(abs(np.linalg.eigvals(a))))


def reference_max_lr(fresh: float, mu: float, nesterov: bool) -> float:
    cs = np.linspace(0.005, 1.0, 200)
    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        ok = all(spectral_radius(mid, c, mu, nesterov, fresh) < 1 - 1e-12 for c in cs)
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


@pytest.mark.parametrize("overlap,members,mu,nesterov", [
    ("eager", 2, 0.9, True), ("eager", 4, 0.9, True), ("eager", 8, 0.9, True),
    ("delayed", 4, 0.9, True), ("delayed", 4, 0.9, False), ("eager", 4, 0.5, False), ("delayed", 3, 0.0, False),
])
def test_bound_matches_eigenvalues(overlap, members, mu, nesterov):
    fresh = 0.0 if overlap == "delayed" else 1.0 / members
    assert overlap_max_stable_lr(overlap, members, mu, nesterov) == pytest.approx(
        reference_max_lr(fresh, mu, nesterov), abs=0.01)


def test_known_values_and_warning():
    # DiLoCo's lr 0.7 with Nesterov 0.9: eager is stable with 2 workers, not with 4; delayed never.
    assert overlap_max_stable_lr("eager", 2, 0.9, True) > 0.7 > overlap_max_stable_lr("eager", 4, 0.9, True)
    assert overlap_max_stable_lr("delayed", 2, 0.9, True) < 0.3
    assert overlap_max_stable_lr("none", 4, 0.9, True) == math.inf
    assert overlap_warning("eager", 2, 0.7, 0.9, True) is None
    assert overlap_warning("delayed", 4, 0.2, 0.9, True) is None
    text = overlap_warning("eager", 4, 0.7, 0.9, True)
    assert "outer.lr <= 0.42" in text and "outer.overlap = eager" in text
    assert overlap_warning("none", 4, 5.0, 0.9, True) is None
