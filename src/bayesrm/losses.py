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
