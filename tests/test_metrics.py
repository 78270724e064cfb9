"""Accuracy, NLL, ECE, AUROC and the probit predictive on hand-computed examples and brute-force oracles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bayesrm.metrics import (
    auroc,
    bt_nll,
    expected_calibration_error,
    map_probability,
    pair_metrics,
    pairwise_accuracy,
    probit_probability,
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
