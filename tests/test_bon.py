"""Tests for bayesrm.bon (BoN estimator, KL, Gao fits, bootstrap) and bayesrm.plots (BoN figures)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from bayesrm.bon import (
    BonCurve,
    bon_curve,
    bon_estimate,
    bon_weights,
    bootstrap_ci,
    default_ns,
    fit_gao_bon,
    gao_bon_curve,
    gao_bon_peak,
    kl_bon,
    kl_bon_beirami,
)
from bayesrm.plots import plot_bon, plot_k_sweep

# ------------------------------------------------------------------------------------------------ oracles


def _brute_force(s: np.ndarray, g: np.ndarray, big_n: int) -> float:
    """Mean of g at the argmax of s over all N-subsets of the pool; argmax ties broken uniformly at random."""
    vals = []
    for subset in itertools.combinations(range(len(s)), big_n):
        sub = np.asarray(subset)
        top = sub[s[sub] == s[sub].max()]  # every tied maximiser is equally likely
        vals.append(g[top].mean())
    return float(np.mean(vals))


def _exact_weight(i: int, big_n: int, n: int) -> float:
    """C(i−1, N−1)/C(n, N) from exact integers (int/int true division is correctly rounded)."""
    return math.comb(i - 1, big_n - 1) / math.comb(n, big_n)


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("n", [1, 2, 5, 9, 30])
def test_weights_match_math_comb(n: int) -> None:
    ns = list(range(1, n + 1))
    W = bon_weights(n, ns)
    expected = np.array([[_exact_weight(i, N, n) for i in range(1, n + 1)] for N in ns])
    assert W.shape == (n, n) and W.dtype == np.float64
    np.testing.assert_allclose(W, expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-13)


def test_weights_accurate_at_paper_pool_size() -> None:
    n = 12500
    ns = default_ns(n)
    W = bon_weights(n, ns)
    positions = np.unique(np.r_[np.arange(1, n + 1, 251), np.arange(n - 60, n + 1)])
    for k, N in enumerate(ns):
        exact = np.array([_exact_weight(int(i), N, n) for i in positions])
        big = exact > 1e-8 * exact.max()  # weights that matter for the estimate
        np.testing.assert_allclose(W[k, positions - 1][big], exact[big], rtol=1e-11)


def test_weights_stable_for_large_pool() -> None:
    n = 20000
    W = bon_weights(n, default_ns(n))
    assert np.all(np.isfinite(W)) and np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-9)
    assert W[0, 0] == pytest.approx(1 / n, rel=1e-14)  # N = 1: uniform
    assert W[-1, -1] == 1.0 and W[-1, :-1].max() == 0.0  # N = n: the top only


def test_weights_reject_bad_n() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        bon_weights(5, [1, 6])
    with pytest.raises(ValueError):
        bon_weights(5, [0])


def test_default_ns() -> None:
    assert default_ns(1) == [1]
    assert default_ns(8) == [1, 2, 4, 8]
    assert default_ns(12500) == [2**k for k in range(14)] + [12500]


# ---------------------------------------------------------------------------------------------- estimator


def test_estimate_matches_brute_force_continuous() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 6, 9):
        s = rng.standard_normal((3, n))
        g = rng.standard_normal((3, n))
        ns = list(range(1, n + 1))
        est = bon_estimate(s, g, ns)
        assert est.shape == (3, n)
        expected = np.array([[_brute_force(s[p], g[p], N) for N in ns] for p in range(3)])
        np.testing.assert_allclose(est, expected, rtol=0, atol=1e-12)


def test_estimate_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(1)
    for n in (4, 7, 9):
        for _ in range(4):
            s = rng.integers(0, 3, size=(2, n)).astype(np.float64)  # few distinct values: many ties
            g = rng.standard_normal((2, n))
            ns = list(range(1, n + 1))
            expected = np.array([[_brute_force(s[p], g[p], N) for N in ns] for p in range(2)])
            np.testing.assert_allclose(bon_estimate(s, g, ns), expected, rtol=0, atol=1e-12)
    s = np.array([[2.0, 2.0, 2.0, 2.0, 2.0]])  # all tied: every N gives the pool mean
    g = np.array([[1.0, 2.0, 3.0, 4.0, 10.0]])
    np.testing.assert_allclose(bon_estimate(s, g, [1, 3, 5]), 4.0, atol=1e-14)


def test_estimate_signed_zero_is_a_tie() -> None:
    s = np.array([[-0.0, 0.0, -1.0]])
    g = np.array([[1.0, 3.0, 0.0]])
    assert bon_estimate(s, g, [3])[0, 0] == pytest.approx(2.0, abs=1e-15)
    assert bon_estimate(s, g, [2])[0, 0] == pytest.approx(_brute_force(s[0], g[0], 2), abs=1e-14)


def test_estimate_matches_monte_carlo() -> None:
    rng = np.random.default_rng(2)
    n, N, draws = 200, 10, 40000
    s = rng.standard_normal(n)
    g = 0.6 * s + 0.8 * rng.standard_normal(n)
    est = bon_estimate(s[None], g[None], [N])[0, 0]
    subsets = np.argsort(rng.random((draws, n)), axis=1)[:, :N]  # (draws, N) uniform N-subsets
    picks = subsets[np.arange(draws), np.argmax(s[subsets], axis=1)]  # (draws,)
    mc = g[picks]
    se = mc.std(ddof=1) / math.sqrt(draws)
    assert abs(est - mc.mean()) < 4 * se
    assert est > g.mean() + 10 * se  # and the check has power: BoN differs from the pool mean


def test_n1_is_pool_mean_and_n_max_is_argmax() -> None:
    rng = np.random.default_rng(3)
    g = rng.standard_normal((5, 50))
    sel_a = rng.standard_normal((5, 50))
    sel_b = np.round(rng.standard_normal((5, 50)), 1)  # with ties
    for sel in (sel_a, sel_b, -g, g):
        est = bon_estimate(sel, g, [1, 50])
        np.testing.assert_allclose(est[:, 0], g.mean(axis=1), atol=1e-13)
        at_max = [g[p][sel[p] == sel[p].max()].mean() for p in range(5)]
        np.testing.assert_allclose(est[:, 1], at_max, atol=1e-13)


def test_estimate_is_monotone_for_self_evaluation() -> None:
    s = np.random.default_rng(4).standard_normal((3, 300))
    est = bon_estimate(s, s, default_ns(300))
    assert np.all(np.diff(est, axis=1) > 0)


def test_ragged_input_equals_per_prompt() -> None:
    rng = np.random.default_rng(5)
    sizes = [5, 9, 5, 12, 9, 5]
    sel = [np.round(rng.standard_normal(m), 1) for m in sizes]
    ev = [rng.standard_normal(m) for m in sizes]
    ns = [1, 2, 4, 5]
    est = bon_estimate(sel, ev, ns)
    assert est.shape == (len(sizes), len(ns))
    for p in range(len(sizes)):
        np.testing.assert_allclose(est[p], bon_estimate(sel[p][None], ev[p][None], ns)[0], rtol=0, atol=1e-15)
    # A list of equal-size pools is the same as the stacked matrix.
    same = [rng.standard_normal(7) for _ in range(3)]
    np.testing.assert_array_equal(
        bon_estimate(same, same, [1, 7]), bon_estimate(np.stack(same), np.stack(same), [1, 7])
    )


def test_estimate_errors() -> None:
    s = np.zeros((4, 6))
    g = np.zeros((4, 6))
    bad = s.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="prompt 3"):
        bon_estimate(bad, g, [1])
    with pytest.raises(ValueError, match="prompt 3"):
        bon_estimate(s, bad, [1])
    inf_eval = g.copy()
    inf_eval[1, 0] = np.inf
    with pytest.raises(ValueError, match="prompt 1"):
        bon_estimate(s, inf_eval, [1])
    with pytest.raises(ValueError, match="exceeds"):
        bon_estimate(s, g, [7])
    with pytest.raises(ValueError, match="prompt 1"):
        bon_estimate([np.zeros(6), np.zeros(3)], [np.zeros(6), np.zeros(3)], [4])
    with pytest.raises(ValueError, match="prompt 1"):
        bon_estimate([np.zeros(6), np.zeros(3)], [np.zeros(6), np.zeros(4)], [1])
    with pytest.raises(ValueError, match="prompt 2"):
        bon_estimate(
            [np.zeros(6), np.zeros(3), np.array([0.0, np.nan, 1.0])],
            [np.zeros(6), np.zeros(3), np.zeros(3)],
            [1],
        )
    with pytest.raises(ValueError):
        bon_estimate(np.zeros(6), np.zeros(6), [1])  # 1-D is ambiguous


def test_large_pool_is_finite() -> None:
    rng = np.random.default_rng(6)
    s = rng.standard_normal((2, 20000))
    est = bon_estimate(s, s, default_ns(20000))
    assert np.all(np.isfinite(est))
    np.testing.assert_allclose(est[:, -1], s.max(axis=1), atol=1e-12)


# ----------------------------------------------------------------------------------------------------- KL


def test_kl_bon() -> None:
    kl = kl_bon([1, 2, 12500])
    assert kl[0] == 0.0
    assert kl[1] == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert round(float(kl[2]), 2) == 8.43


def test_kl_beirami() -> None:
    ns = np.array([1, 2, 10, 1000, 12500])[:, None]
    eps = np.logspace(-12, 0, 40)[None, :]
    kl = kl_bon_beirami(ns, eps)
    bound = kl_bon(ns.ravel())[:, None]
    assert kl.shape == (5, 40) and np.all(np.isfinite(kl))
    assert np.all(kl >= -1e-15) and np.all(kl <= bound + 1e-12)
    np.testing.assert_allclose(kl_bon_beirami(ns, 1e-15), bound, rtol=1e-6)  # ε → 0: the bound
    np.testing.assert_allclose(kl_bon_beirami(ns, 0.0), bound, rtol=0, atol=0)  # ε underflowed: the bound
    assert kl_bon_beirami(10**6, 1e-3) == pytest.approx(math.log(1e3), rel=1e-9)  # large n: log(1/ε)
    assert kl_bon_beirami(1, 0.3) == pytest.approx(0.0, abs=1e-15)
    assert kl_bon_beirami(5, 1.0) == 0.0
    with pytest.raises(ValueError):
        kl_bon_beirami(5, 1.5)


# ---------------------------------------------------------------------------------------------------- Gao


def test_gao_fit_recovers_parameters() -> None:
    ns = default_ns(12500)
    kl = kl_bon(ns)
    d = np.sqrt(kl)
    gold = 0.3 + gao_bon_curve(d, 1.2, 0.35)
    alpha, beta = fit_gao_bon(kl, gold)
    assert alpha == pytest.approx(1.2, rel=1e-10) and beta == pytest.approx(0.35, rel=1e-10)
    alpha_w, beta_w = fit_gao_bon(kl, gold, weights=np.linspace(1, 3, len(ns)))
    assert alpha_w == pytest.approx(1.2, rel=1e-10) and beta_w == pytest.approx(0.35, rel=1e-10)
    d_star, r_star = gao_bon_peak(alpha, beta)
    assert d_star == pytest.approx(1.2 / 0.7) and r_star == pytest.approx(1.44 / 1.4)
    with pytest.raises(ValueError, match="KL = 0"):
        fit_gao_bon(kl[1:], gold[1:])


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((400, 3)) + np.array([0.0, 1.0, 5.0])
    lo, hi = bootstrap_ci(x, n_boot=1000, seed=1)
    mean = x.mean(axis=0)
    assert lo.shape == hi.shape == (3,)
    assert np.all(lo < mean) and np.all(mean < hi)
    se = x.std(axis=0, ddof=1) / math.sqrt(400)
    np.testing.assert_allclose(hi - lo, 2 * 1.96 * se, rtol=0.15)  # close to the normal-theory width
    lo2, _ = bootstrap_ci(x, n_boot=1000, seed=1)
    np.testing.assert_array_equal(lo, lo2)  # seeded


def test_bon_curve_and_roundtrip() -> None:
    rng = np.random.default_rng(8)
    gold = rng.standard_normal((40, 64))
    proxy = gold + rng.standard_normal((40, 64))
    curve = bon_curve("map", proxy, proxy, gold, n_boot=200)
    assert curve.ns.tolist() == default_ns(64)
    np.testing.assert_allclose(curve.kl, kl_bon(default_ns(64)))
    np.testing.assert_allclose(curve.gold, bon_estimate(proxy, gold, default_ns(64)).mean(axis=0))
    np.testing.assert_allclose(curve.proxy, bon_estimate(proxy, proxy, default_ns(64)).mean(axis=0))
    assert curve.gold[0] == pytest.approx(gold.mean())
    assert np.all(curve.gold_lo <= curve.gold) and np.all(curve.gold <= curve.gold_hi)
    back = BonCurve.from_dict(curve.to_dict())
    np.testing.assert_array_equal(back.gold_hi, curve.gold_hi)
    assert back.name == "map" and back.ns.dtype == np.int64


# -------------------------------------------------------------------------------------------------- plots


def _synthetic_curves() -> list[BonCurve]:
    rng = np.random.default_rng(9)
    gold = rng.standard_normal((30, 128))
    curves = []
    for k, name in enumerate(["MAP", "ens-mean", "LA r−kσ", "LA r−kσ²"]):
        proxy = gold + (1.0 - 0.2 * k) * rng.standard_normal((30, 128))
        curves.append(bon_curve(name, proxy, proxy, gold, n_boot=100))
    return curves


def test_plot_bon_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bon.png"
    plot_bon(_synthetic_curves(), path, "synthetic BoN")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["bon.png"]  # no temp file left behind


def test_plot_k_sweep_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "k.png"
    plot_k_sweep(
        {"std": {0.0: 0.1, 0.5: 0.3, 1.0: 0.25}, "var": {0.0: 0.1, 1.0: 0.2, 2.0: 0.22}}, path, "k sweep"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_invariant_to_candidate_order() -> None:
    rng = np.random.default_rng(10)
    s = np.round(rng.standard_normal((4, 40)), 1)  # many ties
    g = rng.standard_normal((4, 40))
    perm = np.argsort(rng.random((4, 40)), axis=1)
    a = bon_estimate(s, g, default_ns(40))
    b = bon_estimate(np.take_along_axis(s, perm, 1), np.take_along_axis(g, perm, 1), default_ns(40))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_ragged_object_array_input() -> None:
    pools = np.empty(2, dtype=object)
    pools[0], pools[1] = np.array([1.0, 3.0, 2.0]), np.array([0.5, -1.0])
    est = bon_estimate(pools, pools, [1, 2])
    np.testing.assert_allclose(est, [[2.0, (2 + 3 + 3) / 3], [-0.25, 0.5]], atol=1e-15)
