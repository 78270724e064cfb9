"""Accuracy, NLL, Brier, ECE/MCE, coverage, selective prediction, AUROC and the probit predictive on hand-computed
examples and brute-force / Monte Carlo oracles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bayesrm.metrics import (
    auroc,
    bootstrap_interval,
    brier_score,
    bt_nll,
    error_auroc,
    expected_calibration_error,
    interval_coverage,
    map_probability,
    maximum_calibration_error,
    pair_metrics,
    pairwise_accuracy,
    probit_probability,
    reliability_bins,
    selective_area,
    selective_curve,
)


def test_accuracy_counts_ties_half() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(2.5 / 4)
    assert pairwise_accuracy(torch.tensor([0.0, 0.0])) == 0.5
    assert pairwise_accuracy(torch.tensor([-3.0])) == 0.0
    with pytest.raises(ValueError, match="zero pairs"):
        pairwise_accuracy(torch.tensor([]))


def test_nll_hand_computed() -> None:
    assert bt_nll(torch.tensor([0.5, 0.25])) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert bt_nll(torch.tensor([0.0])) == pytest.approx(-math.log(1e-12))  # clamped, not inf
    delta = torch.tensor([0.0, math.log(3.0)])  # σ = 0.5, 0.75
    assert torch.allclose(map_probability(delta), torch.tensor([0.5, 0.75], dtype=torch.double))
    m = pair_metrics(delta)
    assert m["nll"] == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert m["accuracy"] == 0.75 and m["n"] == 2.0
    assert pair_metrics(torch.tensor([-100.0]))["nll"] == pytest.approx(100.0)  # exact log σ, no clamping


def test_ece_hand_computed() -> None:
    # confidences 0.93, 0.81, 0.72, 0.56 fall in four different 0.05-wide bins; only p = 0.28 is wrong
    p = torch.tensor([0.93, 0.81, 0.28, 0.56], dtype=torch.double)
    assert expected_calibration_error(p) == pytest.approx((0.07 + 0.19 + 0.72 + 0.44) / 4)
    # one bin: |mean conf − accuracy| = |0.92 − 1|
    assert expected_calibration_error(torch.tensor([0.91, 0.93], dtype=torch.double)) == pytest.approx(0.08)
    # a single bin over everything: |mean(0.9, 0.6, 0.8) − 2/3|
    one = expected_calibration_error(torch.tensor([0.9, 0.4, 0.8], dtype=torch.double), n_bins=1)
    assert one == pytest.approx(abs((0.9 + 0.6 + 0.8) / 3 - 2 / 3))
    assert expected_calibration_error(torch.tensor([0.5, 0.5], dtype=torch.double)) == pytest.approx(0.0)
    # all wrong with confidence 0.9: gap 0.9; all right: gap 0.1
    assert expected_calibration_error(torch.tensor([0.1, 0.1], dtype=torch.double)) == pytest.approx(0.9)
    assert expected_calibration_error(torch.tensor([0.9, 0.9], dtype=torch.double)) == pytest.approx(0.1)


def test_ece_matches_a_reference_implementation() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 200)
    conf, correct = np.maximum(p, 1 - p), (p > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, 11)
    ref = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if sel.any():
            ref += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    assert expected_calibration_error(torch.from_numpy(p)) == pytest.approx(ref, abs=1e-12)


def _auroc_brute(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = sum(float(a > b) + 0.5 * float(a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_counting() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        pos = rng.integers(0, 6, rng.integers(1, 15)).astype(float)  # small integers: many ties
        neg = rng.integers(0, 5, rng.integers(1, 15)).astype(float)
        assert auroc(pos, neg) == pytest.approx(_auroc_brute(pos, neg))
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc(np.array([]), np.array([1.0]))


def test_probit_formula_and_accuracy() -> None:
    mu, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 3.0, 8.0])
    expected = [1 / (1 + math.exp(-m / math.sqrt(1 + math.pi * v / 8))) for m, v in zip(mu, var, strict=True)]
    assert torch.allclose(probit_probability(mu, var), torch.tensor(expected, dtype=torch.double))
    assert probit_probability(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(1 / (1 + math.e ** -1))
    # close to the exact E[σ(Δ)], Δ ~ N(μ, v), by Gauss–Hermite quadrature
    x, w = np.polynomial.hermite_e.hermegauss(80)
    for m, v in ((1.0, 4.0), (-0.5, 1.0), (2.0, 10.0)):
        exact = float((w / (1 + np.exp(-(m + math.sqrt(v) * x)))).sum() / w.sum())
        assert probit_probability(torch.tensor([m]), torch.tensor([v])).item() == pytest.approx(exact, abs=0.02)
    # more variance, closer to 1/2
    p = probit_probability(torch.full((4,), 2.0), torch.tensor([0.0, 1.0, 4.0, 16.0]))
    assert (p.diff() < 0).all() and (p > 0.5).all()


def test_pair_metrics_with_variance_uses_probit() -> None:
    delta, var = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([1.0, 0.5, 4.0])
    m = pair_metrics(delta, var)
    p = probit_probability(delta, var)
    assert m["nll"] == pytest.approx(float(-torch.log(p).mean()))
    assert m["ece"] == pytest.approx(expected_calibration_error(p))
    assert m["accuracy"] == pytest.approx(2 / 3)  # the probit never flips the sign of Δ
    assert p[1] > torch.sigmoid(torch.tensor(-0.5, dtype=torch.double))  # the wrong pair is less confidently wrong


def _brute_bins(p: np.ndarray, n_bins: int) -> list[tuple[float, float, float]]:
    """(weight, conf, acc) per non-empty bin, by listing both orientations of every pair and testing each bin."""
    items = [(max(q, 1 - q), float((q >= 0.5) == y)) for x in p for q, y in ((x, True), (1 - x, False))]
    out = []
    for b in range(n_bins):
        lo, hi = 0.5 + b / (2 * n_bins), 0.5 + (b + 1) / (2 * n_bins)
        inb = [(c, a) for c, a in items if lo - 1e-12 <= c < hi - 1e-12 or (b == n_bins - 1 and c >= hi - 1e-12)]
        if inb:
            out.append((len(inb) / len(items), sum(c for c, _ in inb) / len(inb), sum(a for _, a in inb) / len(inb)))
    return out


def test_ece_mce_and_bins_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    for n_bins in (1, 3, 10):
        p = rng.uniform(0.0, 1.0, 37)
        ref = _brute_bins(p, n_bins)
        t = torch.from_numpy(p)
        assert expected_calibration_error(t, n_bins) == pytest.approx(sum(w * abs(c - a) for w, c, a in ref))
        assert maximum_calibration_error(t, n_bins) == pytest.approx(max(abs(c - a) for _, c, a in ref))
        count, conf, acc = reliability_bins(t, n_bins)
        assert count.sum() == 37 and np.isnan(conf[count == 0]).all()
        got = [(k / 37, c, a) for k, c, a in zip(count, conf, acc, strict=True) if k > 0]
        assert np.allclose(np.array(got), np.array(ref))


def test_mce_and_brier_hand_computed() -> None:
    # bins (10 on [0.5, 1]): 0.93 → gap 0.07, 0.81 → 0.19, 0.28 (conf 0.72, wrong) → 0.72, 0.56 → 0.44
    p = torch.tensor([0.93, 0.81, 0.28, 0.56], dtype=torch.double)
    assert maximum_calibration_error(p) == pytest.approx(0.72)
    assert brier_score(p) == pytest.approx((0.07**2 + 0.19**2 + 0.72**2 + 0.44**2) / 4)
    assert brier_score(torch.tensor([1.0, 0.0])) == pytest.approx(0.5)


def _exact_p(mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(Δ + ε > 0), Δ ~ N(μ, sd²), ε ~ Logistic: E[σ(Δ)] by Gauss–Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return (w / (1 + np.exp(-(mu[:, None] + sd[:, None] * x)))).sum(1) / w.sum()


def test_interval_coverage_decisions_match_monte_carlo_quantiles() -> None:
    # the central interval of U = Δ + ε from 400k draws excludes 0 exactly where the closed form says it does
    rng = np.random.default_rng(3)
    mu, sd = np.array([6.0, -6.0, 0.3, 2.0, 3.0, -1.5]), np.array([0.5, 1.0, 2.0, 0.1, 1.0, 0.5])
    p = _exact_p(mu, sd)
    for level in (0.5, 0.9, 0.95):
        a = (1 - level) / 2
        u = mu[:, None] + sd[:, None] * rng.standard_normal((6, 200_000)) + rng.logistic(size=(6, 200_000))
        lo, hi = np.quantile(u, [a, 1 - a], axis=1)
        assert np.all(np.minimum(np.abs(p - a), np.abs(p - 1 + a)) > 0.01)  # no case within MC error of an edge
        for i in range(6):
            one = interval_coverage(torch.tensor([p[i]]), level)
            assert one["decisive"] == float(lo[i] > 0 or hi[i] <= 0)
            assert one["observed"] == float(hi[i] > 0)  # covers chosen-wins unless it lies entirely below 0


def test_interval_coverage_matches_its_claim_for_a_known_gaussian() -> None:
    # draw true gaps from the predictive itself: observed sign coverage must equal the claim (up to MC error)
    rng = np.random.default_rng(4)
    n = 60_000
    mu, sd = rng.normal(0, 3, n), rng.uniform(0.1, 2.5, n)
    p = _exact_p(mu, sd)
    y = mu + sd * rng.standard_normal(n) + rng.logistic(size=n) > 0  # chosen wins?
    p_obs = torch.from_numpy(np.where(y, p, 1 - p))  # pairs oriented so the observed winner is "chosen"
    for level in (0.5, 0.9, 0.95):
        cov = interval_coverage(p_obs, level)
        se = math.sqrt(cov["claimed"] * (1 - cov["claimed"]) / n)
        assert cov["observed"] == pytest.approx(cov["claimed"], abs=4 * se + 1e-3)
        assert cov["claimed"] >= (1 + level) / 2 - 1e-12
    # an overconfident predictive (σ ignored, μ doubled) covers less often than it claims
    bad = torch.from_numpy(np.where(y, 1 / (1 + np.exp(-2 * mu)), 1 / (1 + np.exp(2 * mu))))
    cov = interval_coverage(bad, 0.9)
    assert cov["observed"] < cov["claimed"] - 0.02
    with pytest.raises(ValueError, match="level"):
        interval_coverage(p_obs, 1.0)


def _selective_brute(correct: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Top-k accuracy averaged over every ordering consistent with the confidence ranking (all tie permutations)."""
    n = len(correct)
    orders = [perm for perm in itertools.permutations(range(n))
              if all(conf[perm[i]] >= conf[perm[i + 1]] for i in range(n - 1))]
    acc = np.array([[correct[list(o[:k])].mean() for k in range(1, n + 1)] for o in orders])
    return acc.mean(0)


def test_selective_curve_matches_brute_force_over_tie_orders() -> None:
    rng = np.random.default_rng(5)
    for _ in range(6):
        n = int(rng.integers(1, 8))
        correct = rng.choice([0.0, 0.5, 1.0], n, p=[0.3, 0.1, 0.6])
        conf = rng.integers(0, 3, n).astype(float)  # few values: many ties
        assert np.allclose(selective_curve(correct, conf), _selective_brute(correct, conf))
        assert selective_area(correct, conf) == pytest.approx(_selective_brute(correct, conf).mean())
    # hand example: ranked right, right, wrong → 1, 1, 2/3
    assert np.allclose(selective_curve(np.array([0.0, 1, 1]), np.array([0.1, 0.9, 0.5])), [1, 1, 2 / 3])
    with pytest.raises(ValueError, match="equal-length"):
        selective_curve(np.array([1.0]), np.array([1.0, 2.0]))


def test_error_auroc_is_pairwise_counting_over_errors_and_hits() -> None:
    u = np.array([0.9, 0.2, 0.5, 0.5, 0.1, 0.7])
    c = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 1.0])  # the 0.5 tie is left out
    assert error_auroc(u, c) == pytest.approx(_auroc_brute(np.array([0.9, 0.5]), np.array([0.2, 0.5, 0.7])))
    assert error_auroc(u, np.ones(6)) is None


def test_bootstrap_interval_matches_the_normal_approximation_and_resamples_groups() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(1.0, 2.0, 400)
    ci = bootstrap_interval(lambda i: float(x[i].mean()), len(x), n_boot=2000)
    assert ci is not None
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert ci[0] == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert ci[1] == pytest.approx(x.mean() + half, abs=0.25 * half)
    # groups of identical values: resampling by group gives a wider interval than pretending items are independent
    g = np.repeat(np.arange(20), 20)
    y = np.repeat(rng.normal(0, 1, 20), 20)
    flat = bootstrap_interval(lambda i: float(y[i].mean()), len(y))
    grouped = bootstrap_interval(lambda i: float(y[i].mean()), len(y), groups=list(g))
    assert flat is not None and grouped is not None
    assert grouped[1] - grouped[0] > 2 * (flat[1] - flat[0])
    assert bootstrap_interval(lambda i: None, 10) is None
