"""Active labelling: BALD against Monte Carlo, and the ranking rules."""

from __future__ import annotations

import pytest
import torch

from bayesrm.active import bald_bt, bernoulli_entropy_logit, select_top

D = torch.double


def _mc_bald(mu: torch.Tensor, var: torch.Tensor, samples: int, seed: int = 0) -> torch.Tensor:
    """H[mean σ(Δ_s)] − mean H[σ(Δ_s)] over Δ_s ~ N(μ, Var) (the definition, sampled)."""
    g = torch.Generator().manual_seed(seed)
    d = mu[:, None] + var.sqrt()[:, None] * torch.randn(len(mu), samples, generator=g, dtype=D)
    p = torch.sigmoid(d).mean(1)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) - bernoulli_entropy_logit(d).mean(1)


def test_bald_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(1)
    mu = 2.0 * torch.randn(60, generator=g, dtype=D)
    var = 4.0 * torch.rand(60, generator=g, dtype=D) ** 2
    exact, mc = bald_bt(mu, var), _mc_bald(mu, var, 200_000)
    assert float((exact - mc).abs().max()) < 2e-3  # MC standard error ~5e-4 at this sample size
    assert float(exact.max()) > 0.1  # the check covers informative pairs, not only ~0 values


def test_bald_limits() -> None:
    mu = torch.tensor([-3.0, 0.0, 0.5, 4.0], dtype=D)
    assert torch.allclose(bald_bt(mu, torch.zeros(4, dtype=D)), torch.zeros(4, dtype=D), atol=1e-12)
    grow = bald_bt(torch.zeros(4, dtype=D), torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=D))
    assert bool((grow.diff() > 0).all()) and float(grow[-1]) < torch.log(torch.tensor(2.0))
    # same σ_Δ, larger |μ_Δ|: the label is predictable, so it teaches less
    assert float(bald_bt(torch.tensor([0.0], dtype=D), torch.tensor([1.0], dtype=D))) > float(
        bald_bt(torch.tensor([3.0], dtype=D), torch.tensor([1.0], dtype=D)))


def test_select_top_rules() -> None:
    mu = torch.tensor([0.0, 9.0, 0.1, -0.2], dtype=D)
    var = torch.tensor([0.5, 4.0, 2.0, 0.0], dtype=D)
    assert select_top(mu, var, 2, "sigma") == [1, 2]
    assert select_top(mu, var, 2, "bald") == [2, 0]  # pair 1 has the largest σ but |μ| = 9 makes its label sure
    r = select_top(mu, var, 4, "random", seed=3)
    assert sorted(r) == [0, 1, 2, 3] and r == select_top(mu, var, 4, "random", seed=3)
    with pytest.raises(ValueError):
        select_top(mu, var, 0, "bald")
    with pytest.raises(ValueError):
        select_top(mu, var, 1, "entropy")
