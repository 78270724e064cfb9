"""Explanations of a BNRM reward model: its factors, ranked, with the responses that load on them (paper App. B)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bayesrm.model import RewardModel


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation; None when undefined (a constant x or y), so JSON gets null, not NaN."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else None


def explain_factors(model: RewardModel, prompts: Sequence[str], responses: Sequence[str], top_k: int = 10,
                    per_factor: int = 5, batch_size: int = 32, by: str = "phi", theta: torch.Tensor | None = None
                    ) -> dict[str, Any]:
    """Top-k factors and, for each, the responses with the largest θ_k, their lengths in words and r(θ_k, length).

    Ranking `by`: "phi" (E[Φ_k], the paper's App. B), "contribution" (mean θ_k Φ_k: what the reward is made of)
    or "spread" (std of θ_k Φ_k over the responses: what moves rewards between them). `theta`: precomputed
    `factor_activations(model, prompts, responses)` (N, K).
    """
    if by not in ("phi", "contribution", "spread"):
        raise ValueError(f"by must be 'phi', 'contribution' or 'spread', got {by!r}")
    head = model.head
    if not hasattr(head, "phi"):
        raise ValueError("factor explanations need a BNRM model (train with --head bnrm)")
    if theta is None:
        theta = factor_activations(model, prompts, responses, batch_size)  # (N, K)
    phi = F.relu(head.phi.detach()).double().cpu()  # (K,)
    words = torch.tensor([len(r.split()) for r in responses], dtype=torch.double)  # (N,)
    rank = {"phi": phi, "contribution": theta.mean(0) * phi, "spread": theta.std(0) * phi}[by]
    factors = []
    for k in torch.argsort(rank, descending=True)[:top_k].tolist():
        col = theta[:, k]  # (N,)
        top = torch.argsort(col, descending=True)[:per_factor].tolist()
        factors.append({
            "factor": k, "phi": float(phi[k]), "mean_theta": float(col.mean()), "std_theta": float(col.std()),
            "active_frac": float((col > 2e-6).double().mean()), "length_corr": _pearson(col, words),
            "top": [{"prompt": prompts[i], "response": responses[i], "theta": float(col[i]),
                     "words": int(words[i])} for i in top]})
    return {"k": int(phi.numel()), "active_phi": int((phi > 0).sum()),
            "active_theta": int((theta > 2e-6).any(0).sum()), "n_responses": len(responses), "ranked_by": by,
            "factors": factors}


def factor_activations(model: RewardModel, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32
                       ) -> torch.Tensor:
    """BNRM factor loadings E_q[θ] per response, (N, K) float64 (interpretability, paper App. B)."""
    return model.per_response(prompts, responses, model.head.theta, batch_size)
