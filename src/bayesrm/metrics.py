"""Evaluation metrics for preference models: accuracy, BT NLL, ECE, AUROC."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pairwise_accuracy(delta: torch.Tensor) -> float:
    """Fraction of pairs with r_w > r_l (ties count half)."""
    if delta.numel() == 0:
        raise ValueError("accuracy of zero pairs")
    return float(((delta > 0).double() + 0.5 * (delta == 0).double()).mean())


def bt_nll(p_chosen: torch.Tensor) -> float:
    """Mean negative log-likelihood −log P(y_w ≻ y_l), probabilities clamped away from 0."""
    return float(-torch.log(p_chosen.double().clamp_min(1e-12)).mean())


def map_probability(delta: torch.Tensor) -> torch.Tensor:
    """MAP preference probability σ(Δ)."""
    return torch.sigmoid(delta.double())


def probit_probability(mean_delta: torch.Tensor, var_delta: torch.Tensor) -> torch.Tensor:
    """MacKay probit approximation E[σ(Δ)] ≈ σ(μ_Δ / sqrt(1 + π Var(Δ)/8)) (MacKay 1992)."""
    return torch.sigmoid(mean_delta.double() / torch.sqrt(1.0 + torch.pi * var_delta.double() / 8.0))


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b/n)|conf_b − acc_b| (Guo et al. 2017), `n_bins` equal bins of conf = max(p, 1−p) on [0.5, 1].

    Symmetrised: each pair counts as both (p, y=1) and (1−p, y=0), so the order of a pair does not matter and p = 0.5
    is half right. Bins are [lo, hi) with the last one closed; a value on an edge goes up despite rounding.
    """
    p = torch.cat([p_chosen.double(), 1.0 - p_chosen.double()])
    y = torch.cat([torch.ones_like(p_chosen, dtype=torch.double), torch.zeros_like(p_chosen, dtype=torch.double)])
    conf = torch.maximum(p, 1 - p)
    correct = ((p >= 0.5).double() == y).double()
    bins = torch.clamp(torch.floor((conf - 0.5) * 2 * n_bins + 1e-9), 0, n_bins - 1).long()  # (2N,)
    ece = torch.zeros((), dtype=torch.double)
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.double().mean() * (conf[sel].mean() - correct[sel].mean()).abs()
    return float(ece)


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

