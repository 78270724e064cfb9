"""Evaluation metrics for preference models: accuracy, BT NLL, ECE, AUROC."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pairwise_accuracy(delta: torch.Tensor) -> float:
    """Fraction of pairs with r_w > r_l (ties count half)."""
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
    """ECE of binary predictions, symmetrised: each pair is scored as both (p, 1) and (1−p, 0)."""
    p = torch.cat([p_chosen.double(), 1.0 - p_chosen.double()])
    y = torch.cat([torch.ones_like(p_chosen, dtype=torch.double), torch.zeros_like(p_chosen, dtype=torch.double)])
    conf = torch.maximum(p, 1 - p)
    correct = ((p >= 0.5).double() == y).double()
    bins = torch.clamp((conf - 0.5) * 2 * n_bins, 0, n_bins - 1).long()
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

