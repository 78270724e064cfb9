"""The Bradley–Terry likelihood of preference reward models: the loss training minimises and the GGN weight the
Laplace fit uses, in one place."""

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


def pair_nll(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0, center_coef: float = 0.0
             ) -> torch.Tensor:
    """Per-pair training objective: BT NLL with margin plus c·(r_w + r_l)² (Eisenstein et al. 2023 centering)."""
    loss = bradley_terry_loss(r_chosen, r_rejected, margin)
    return loss + center_coef * centering_penalty(r_chosen, r_rejected) if center_coef else loss


def bt_ggn_weight(delta: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """GGN weight of the BT likelihood Λ = p(1 − p) with p = σ(Δ − m) (laplace-lora.md §2)."""
    p = torch.sigmoid(delta - margin)
    return p * (1.0 - p)
