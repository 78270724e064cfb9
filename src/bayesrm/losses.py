"""Training losses for preference reward models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """Per-pair BT negative log-likelihood −log σ(r_w − r_l − m) (Bradley & Terry 1952; Ouyang et al. 2022)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def centering_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-centering term (r_w + r_l)² that pins the BT shift (Eisenstein et al. 2023)."""
    return (r_chosen + r_rejected) ** 2


def bt_ggn_weight(delta: torch.Tensor) -> torch.Tensor:
    """GGN weight of the BT likelihood, Λ = ∂²(−log σ(Δ))/∂Δ² = σ(Δ)σ(−Δ) = p(1 − p) (laplace-lora.md §2)."""
    return torch.sigmoid(delta) * torch.sigmoid(-delta)


def dense_ggn(jac_delta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Exact BT GGN Σ_n Λ_n J_Δ,n J_Δ,nᵀ from pair Jacobians J_Δ = ∂(r_w − r_l)/∂θ (N, P) and Δ (N,) → (P, P)."""
    lam = bt_ggn_weight(delta).to(jac_delta.dtype)  # (N,)
    return (jac_delta.T * lam) @ jac_delta
