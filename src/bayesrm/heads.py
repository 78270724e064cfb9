"""Reward heads: what turns reward-token features (B, d) into rewards (B,). One interface, one factory.

Every head is an `nn.Module` with

- `forward(features, mode="mean") -> (B,)` rewards (`mode="sample"` draws from a stochastic head),
- `regularizer(n_data) -> Tensor | None`, the per-pair term the training loss adds (BNRM's η·KL),
- `moments(features) -> (mean, var)` and `pair_moments(f_w, f_l) -> (E[Δ], Var[Δ])`, a variational predictive
  where the head has one (BNRM); the linear BT head raises and points at the Laplace posterior instead,
- `has_moments`, whether the two above work.

`build_head` is the only place that knows the head kinds; `RewardModel` never branches on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bayesrm.config import Head


class LinearHead(nn.Linear):
    """The Bradley–Terry scalar head r = wᵀf + b, with b frozen at 0 (BT sees only differences)."""

    has_moments = False

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, 1)
        nn.init.normal_(self.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.bias)
        self.bias.requires_grad_(False)  # no gradient signal under BT

    def forward(self, features: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        return super().forward(features).squeeze(-1)  # (B,)

    def regularizer(self, n_data: int) -> torch.Tensor | None:
        return None

    def moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        require_moments(self)
        raise AssertionError  # unreachable: require_moments raises for this head

    def pair_moments(self, f_w: torch.Tensor, f_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moments(f_w)


def require_moments(head: nn.Module) -> None:
    """ValueError, naming what to use instead, unless `head` has a variational predictive (BNRM)."""
    if not getattr(head, "has_moments", False):
        raise ValueError("this model has a linear BT head: predictive moments need head='bnrm'; for a BT model "
                         "fit a Laplace posterior (`bayesrm laplace`) and use LaplacePosterior.predict")


def build_head(kind: Head | str, hidden: int, bnrm: dict[str, Any] | None = None) -> nn.Module:
    """The head of `kind` for features of width `hidden` (draws its initial weights from torch's RNG)."""
    if Head(kind) is Head.BNRM:
        from bayesrm.bnrm import BNRMConfig, BNRMHead

        return BNRMHead(hidden, BNRMConfig.from_dict(bnrm or {}))
    return LinearHead(hidden)
