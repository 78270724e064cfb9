"""Evaluation metrics for preference models: accuracy, BT NLL, Brier, ECE/MCE, interval coverage, selective
prediction, AUROC and bootstrap CIs, as pure functions of reward differences and predictive probabilities."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def pair_correct(delta: torch.Tensor) -> torch.Tensor:
    """Per-pair correctness 1[Δ > 0] + ½·1[Δ = 0], float64 (N,)."""
    return (delta > 0).double() + 0.5 * (delta == 0).double()


def pairwise_accuracy(delta: torch.Tensor) -> float:
    """Fraction of pairs with r_w > r_l (ties count half)."""
    if delta.numel() == 0:
        raise ValueError("accuracy of zero pairs")
    return float(pair_correct(delta).mean())


def bt_nll(p_chosen: torch.Tensor) -> float:
    """Mean negative log-likelihood −log P(y_w ≻ y_l), probabilities clamped away from 0."""
    return float(-torch.log(p_chosen.double().clamp_min(1e-12)).mean())


def map_probability(delta: torch.Tensor) -> torch.Tensor:
    """MAP preference probability σ(Δ)."""
    return torch.sigmoid(delta.double())


def probit_probability(mean_delta: torch.Tensor, var_delta: torch.Tensor) -> torch.Tensor:
    """MacKay probit approximation E[σ(Δ)] ≈ σ(μ_Δ / sqrt(1 + π Var(Δ)/8)) (MacKay 1992)."""
    return torch.sigmoid(mean_delta.double() / torch.sqrt(1.0 + torch.pi * var_delta.double() / 8.0))


def reliability_bins(p_chosen: torch.Tensor, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, mean confidence, accuracy), each (n_bins,), of conf = max(p, 1−p) in equal bins of [0.5, 1].

    Symmetrised: each pair counts as both (p, y=1) and (1−p, y=0), so the order of a pair does not matter and p = 0.5
    is half right. Bins are [lo, hi) with the last one closed; a value on an edge goes up despite rounding. Empty bins
    have count 0 and NaN confidence and accuracy.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    p = torch.cat([p_chosen.double(), 1.0 - p_chosen.double()])
    y = torch.cat([torch.ones_like(p_chosen, dtype=torch.double), torch.zeros_like(p_chosen, dtype=torch.double)])
    conf = torch.maximum(p, 1 - p)
    correct = ((p >= 0.5).double() == y).double()
    bins = torch.clamp(torch.floor((conf - 0.5) * 2 * n_bins + 1e-9), 0, n_bins - 1).long()  # (2N,)
    count = torch.bincount(bins, minlength=n_bins).double()  # (n_bins,)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = (torch.bincount(bins, conf, minlength=n_bins) / count).numpy()
        acc = (torch.bincount(bins, correct, minlength=n_bins) / count).numpy()
    return count.numpy() / 2, mean_conf, acc


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b/n)|conf_b − acc_b| (Guo et al. 2017) over the symmetrised bins of `reliability_bins`."""
    count, conf, acc = reliability_bins(p_chosen, n_bins)
    sel = count > 0
    return float((count[sel] / count.sum() * np.abs(conf[sel] - acc[sel])).sum())


def maximum_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """MCE = max_b |conf_b − acc_b| over non-empty bins (Naeini et al. 2015), bins as in `reliability_bins`."""
    count, conf, acc = reliability_bins(p_chosen, n_bins)
    sel = count > 0
    return float(np.abs(conf[sel] - acc[sel]).max())


def brier_score(p_chosen: torch.Tensor) -> float:
    """Brier score mean (1 − p)² of P(chosen ≻ rejected) against the observed label y = 1 (Brier 1950)."""
    return float((1.0 - p_chosen.double()).square().mean())


def interval_coverage(p_chosen: torch.Tensor, level: float) -> dict[str, float]:
    """Sign coverage of the central `level` predictive interval of the latent utility gap U = Δ + ε.

    Under Bradley–Terry the label is y = 1[U > 0] with ε ~ Logistic(0, 1), and U itself is never observed; only its
    sign is. With p = P(U > 0) the predictive probability of the observed outcome (chosen wins), the interval
    [q_a, q_{1−a}], a = (1 − level)/2, lies above 0 iff p > 1 − a and below 0 iff p ≤ a. It covers the observation
    when it holds a value of the observed sign, i.e. unless it lies entirely below 0. The predictive's own claim
    for that event is p (interval above 0), 1 − p (below) or 1 (straddling 0); a calibrated predictive covers as
    often as it claims, which is at least (1 + level)/2 because a sign is coarser than U.
    Returns observed, claimed, and decisive (the fraction of intervals that exclude 0).
    """
    if not 0 < level < 1:
        raise ValueError(f"coverage level must be in (0, 1), got {level}")
    p = p_chosen.double()
    a = (1.0 - level) / 2
    above, below = p > 1 - a, p <= a
    claimed = torch.where(above, p, torch.where(below, 1 - p, torch.ones_like(p)))
    return {"observed": float((~below).double().mean()), "claimed": float(claimed.mean()),
            "decisive": float((above | below).double().mean())}


def selective_curve(correct: np.ndarray | torch.Tensor, confidence: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accuracy of the k most confident pairs for k = 1..N, (N,), ties in confidence broken uniformly at random.

    Within a group of equal confidence straddling the cut, each member counts with the group's mean correctness
    (the expectation over random tie-breaking), so the curve does not depend on input order.
    """
    c = np.asarray(correct, dtype=np.float64)
    s = np.asarray(confidence, dtype=np.float64)
    if c.shape != s.shape or c.ndim != 1 or len(c) == 0:
        raise ValueError(f"correct and confidence must be equal-length non-empty vectors, got {c.shape}, {s.shape}")
    order = np.argsort(-s, kind="stable")
    c, s = c[order], s[order]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # (G,) first index of each tie group
    size = np.diff(np.r_[start, len(s)])  # (G,)
    cum = np.r_[0.0, np.cumsum(c)]  # (N+1,) correct among the first i
    group_rate = (cum[start + size] - cum[start]) / size  # (G,)
    g = np.repeat(np.arange(len(start)), size)  # (N,) group of each position
    k = np.arange(1, len(c) + 1)  # (N,)
    expected = cum[start[g]] + (k - start[g]) * group_rate[g]  # (N,)
    return expected / k


def selective_area(correct: np.ndarray | torch.Tensor, confidence: np.ndarray | torch.Tensor) -> float:
    """Area under the accuracy–coverage curve, (1/N) Σ_k acc@k (El-Yaniv & Wiener 2010; 1 − AURC of Geifman 2018)."""
    return float(selective_curve(correct, confidence).mean())


def error_auroc(uncertainty: np.ndarray | torch.Tensor, correct: np.ndarray | torch.Tensor) -> float | None:
    """AUROC of an uncertainty score for telling errors (correct = 0) from hits (correct = 1); None if one is absent.

    Pairs with correct = 0.5 (exact ties of Δ) are left out.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    err, hit = u[c == 0], u[c == 1]
    return auroc(err, hit) if len(err) and len(hit) else None


def bootstrap_interval(stat: Callable[[np.ndarray], float | None], n: int, groups: Sequence[Any] | None = None,
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap CI of `stat(indices)` over n items, resampling whole groups (e.g. prompts) if given.

    Replicates where `stat` returns None are dropped; None when fewer than half of them are left.
    """
    if n < 1 or n_boot < 1 or not 0 < level < 1:
        raise ValueError("need n ≥ 1, n_boot ≥ 1 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group labels for {n} items")
        _, inv = np.unique(np.asarray([str(x) for x in groups]), return_inverse=True)
        members = [np.flatnonzero(inv == k) for k in range(int(inv.max()) + 1)]
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        v = stat(np.concatenate([members[j] for j in pick]))
        if v is not None and np.isfinite(v):
            vals.append(v)
    if len(vals) < n_boot / 2:
        return None
    lo, hi = np.quantile(np.asarray(vals), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auroc(scores_pos: np.ndarray | torch.Tensor, scores_neg: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve for separating positives (higher score) from negatives (Mann–Whitney U)."""
    from scipy.stats import rankdata

    pos = np.asarray(scores_pos, dtype=np.float64)
    neg = np.asarray(scores_neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def pair_metrics(delta: torch.Tensor, var_delta: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy, NLL and ECE from reward differences, with the probit predictive when Var(Δ) is given."""
    if var_delta is None:
        p, nll = map_probability(delta), float(-F.logsigmoid(delta.double()).mean())  # exact for large |Δ|
    else:
        p = probit_probability(delta, var_delta)
        nll = bt_nll(p)
    return {"accuracy": pairwise_accuracy(delta), "nll": nll, "ece": expected_calibration_error(p),
            "n": float(len(delta))}

