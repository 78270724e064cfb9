"""Bayesian non-negative reward model (BNRM) head (Duan et al. 2026; derivations in shared/papers/bnrm.md).

r(x, y) = θ(x, y)ᵀ Φ + b: a local θ ∈ R₊ᴷ per (prompt, response), amortised from the backbone's hidden state at
the reward token, and a global Φ ∈ R₊ᴷ shared by all data. Both have Gamma(α, β) priors and Weibull variational
posteriors (reparameterised draws, closed-form KL to the Gamma prior as in WHAI, Zhang et al. 2018). Training
minimises BT NLL + η (KL_θ + KL_Φ). The inference network follows the released code (Alg. 1): two MLPs give θ's
posterior mean (ReLU) and Weibull shape (1 + softplus); Φ's shape comes from an MLP applied to each factor's mean.

Deliberate departures from the released code (bnrm.md, "pitfalls"), each switchable where that is cheap:

1. KL_θ is taken at the reward token only and summed over K per response, i.e. the ELBO's own reduction. The code
   sums it over every position, pads included, and averages over K; with its pads to T = 1024 ≈ K that is about
   the same weight per response. The all-positions variant is not offered: it needs every token's head output.
2. KL_Φ is divided by the training-set size N (`kl_phi_scale="dataset"`), as the ELBO spread over N pairs requires;
   `"none"` adds it in full every step, as the code does (which also averages it over K: use η/K to match that).
3. Φ starts at |U(−1/√K, 1/√K)|, so every factor is alive (`phi_init="abs"`); `"linear"` is the code's nn.Linear
   init, under which ReLU zeroes about half of Φ with zero gradient for good.
4. The bias b is a plain scalar, not the code's ReLU(b) at b = 0 (zero gradient: it can never move). BT sees only
   differences, so b has no signal from BT (Adam would turn the rounding residue of its cancelled gradient into
   steps): it stays frozen at 0 unless `learnable_bias`, meant for TrainConfig.center_coef > 0, which does see it.
5. The sampling mode is explicit: `mode="mean"` scores with the posterior means (deterministic, what the paper
   evaluates with), `"sample"` draws θ per response and one Φ per batch. RewardModel uses "sample" only in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EULER_GAMMA = 0.5772156649015329
_LOG_FLOOR = 1e-10  # the released code's log_max floor, for log λ of dead Φ factors and log(−log(1 − u))


class Mode(str, Enum):
    """How the head turns its posterior into a reward."""

    MEAN = "mean"  # posterior means of θ and Φ: deterministic
    SAMPLE = "sample"  # one reparameterised Weibull draw of θ per response and one of Φ per batch


class PhiInit(str, Enum):
    """Initialisation of w, where E_q[Φ] = ReLU(w)."""

    ABS = "abs"  # |U(−1/√K, 1/√K)|: every factor starts alive
    LINEAR = "linear"  # nn.Linear's U(−1/√K, 1/√K), as released: ~half the factors dead from the start


class KLPhiScale(str, Enum):
    """How the global KL_Φ enters a per-pair loss."""

    DATASET = "dataset"  # KL_Φ / N (ELBO, Eq. 9, divided by the N training pairs)
    NONE = "none"  # KL_Φ every step (the released code)


@dataclass
class BNRMConfig:
    """BNRM head settings (paper Table 9 / released code unless noted); stored in RMConfig.bnrm."""

    k: int = 1024  # latent factors K
    eta: float = 1e-5  # KL weight η
    prior_shape: float = 1.0  # Gamma prior shape α for θ and Φ (code: 1)
    prior_rate: float = 1.0  # Gamma prior rate β for θ and Φ (code: 1, i.e. Exp(1))
    kl_phi_scale: str = KLPhiScale.DATASET.value  # dataset (ELBO) | none (released code)
    phi_init: str = PhiInit.ABS.value  # abs (all factors alive) | linear (released code)
    dropout: float = 0.1  # on the reward-token hidden state before the inference nets (code: 0.1)
    hidden: int = 1024  # width of the inference MLPs (code: 1024)
    learnable_bias: bool = False  # train b (needs a loss that sees absolute rewards, e.g. center_coef); else b = 0

    def __post_init__(self) -> None:
        self.kl_phi_scale = KLPhiScale(self.kl_phi_scale).value
        self.phi_init = PhiInit(self.phi_init).value
        if self.k < 1 or self.hidden < 1:
            raise ValueError(f"bnrm k and hidden must be ≥ 1, got k={self.k}, hidden={self.hidden}")
        if self.eta < 0 or self.prior_shape <= 0 or self.prior_rate <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("bnrm needs eta ≥ 0, prior_shape > 0, prior_rate > 0 and dropout in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BNRMConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown bnrm config fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- pure maths


def weibull_mean(k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """E[Weibull(k, λ)] = λ Γ(1 + 1/k) (bnrm.md, "Weibull moments")."""
    return lam * torch.exp(torch.lgamma(1.0 + 1.0 / k))


def weibull_var(k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Var[Weibull(k, λ)] = λ² [Γ(1 + 2/k) − Γ(1 + 1/k)²] (bnrm.md); float64 for k ≫ 10 (cancellation)."""
    g1, g2 = torch.lgamma(1.0 + 1.0 / k), torch.lgamma(1.0 + 2.0 / k)
    return (lam * torch.exp(g1)).square() * torch.expm1(g2 - 2.0 * g1)


def weibull_scale(k: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """λ = E / Γ(1 + 1/k), the scale that gives a Weibull of shape k the mean E (bnrm.md, inference network)."""
    return mean * torch.exp(-torch.lgamma(1.0 + 1.0 / k))


def weibull_rsample(k: torch.Tensor, lam: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised draw λ (−log(1 − u))^{1/k}, u ~ U(0, 1) (inverse CDF; WHAI, bnrm.md inference network)."""
    if u is None:
        u = torch.rand_like(lam)
    e = (-torch.log1p(-u)).clamp_min(_LOG_FLOOR)  # u = 0 would give 0^{1/k}, whose k-gradient is NaN
    return lam * torch.exp(torch.log(e) / k)


def kl_weibull_gamma(k: torch.Tensor, lam: torch.Tensor, alpha: float | torch.Tensor,
                     beta: float | torch.Tensor) -> torch.Tensor:
    """KL(Weibull(k, λ) ‖ Gamma(α, rate β)) element-wise, closed form (WHAI, Zhang et al. 2018; bnrm.md Eqs.)."""
    a = torch.as_tensor(alpha, dtype=lam.dtype, device=lam.device)
    b = torch.as_tensor(beta, dtype=lam.dtype, device=lam.device)
    log_lam = torch.log(lam.clamp_min(_LOG_FLOOR))  # a dead Φ factor (λ = 0) adds a constant, no gradient
    return (EULER_GAMMA * a / k - a * log_lam + torch.log(k) + b * lam * torch.exp(torch.lgamma(1.0 + 1.0 / k))
            - EULER_GAMMA - 1.0 - a * torch.log(b) + torch.lgamma(a))


def bnrm_reward_moments(mu_th: torch.Tensor, s2_th: torch.Tensor, mu_phi: torch.Tensor, s2_phi: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """E[θᵀΦ] = Σ μθμΦ, Var = Σ (s²θ s²Φ + s²θ μΦ² + s²Φ μθ²) under q(θ)q(Φ); (B, K), (K,) → (B,), (B,) (bnrm.md)."""
    mean = mu_th @ mu_phi  # (B,)
    var = s2_th @ (s2_phi + mu_phi.square()) + mu_th.square() @ s2_phi  # (B,)
    return mean, var


def pair_covariance(mu_th1: torch.Tensor, mu_th2: torch.Tensor, s2_phi: torch.Tensor) -> torch.Tensor:
    """Cov[r1, r2] = Σ_k μθ1,k μθ2,k s²Φ,k through the shared Φ; (B, K), (B, K), (K,) → (B,) (bnrm.md)."""
    return (mu_th1 * mu_th2) @ s2_phi


# --------------------------------------------------------------------------- the head


class Posterior(NamedTuple):
    """Variational posterior moments for a batch: θ per response (B, K), Φ shared (K,)."""

    mu_theta: torch.Tensor
    var_theta: torch.Tensor
    mu_phi: torch.Tensor
    var_phi: torch.Tensor


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out))


class BNRMHead(nn.Module):
    """Reward-token features (B, d) → rewards (B,) with a Weibull–Gamma non-negative factor model.

    A training-mode forward stashes its KL terms (`last_kl`) for `kl_loss`, which the training loop adds to the
    BT loss; `kl_log` keeps their detached values (KL_θ per response, KL_Φ) for logging.
    """

    def __init__(self, hidden: int, cfg: BNRMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.mean_net = _mlp(hidden, cfg.hidden, cfg.k)  # MLP_l: E_q[θ] through ReLU
        self.shape_net = _mlp(hidden, cfg.hidden, cfg.k)  # MLP_k: Weibull shape of θ through 1 + softplus
        self.phi_shape_net = _mlp(1, cfg.hidden, 1)  # MLP_kw: Weibull shape of each Φ_k from its mean
        bound = 1.0 / math.sqrt(cfg.k)
        w = torch.empty(cfg.k).uniform_(-bound, bound)  # (K,)
        self.phi = nn.Parameter(w.abs() if PhiInit(cfg.phi_init) is PhiInit.ABS else w)  # E_q[Φ] = ReLU(w)
        self.bias = nn.Parameter(torch.zeros(()), requires_grad=cfg.learnable_bias)
        self.last_kl: dict[str, torch.Tensor] = {}
        self.kl_log: dict[str, float] = {}

    def theta_params(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and Weibull shape of θ, (B, K) each; dropout applies in training mode."""
        h = self.drop(features)  # (B, d)
        mu = F.relu(self.mean_net(h)).clamp(1e-6, 1e4)  # (B, K)
        shape = 1.0 + F.softplus(self.shape_net(h)).clamp(1e-6, 1e4)  # (B, K), ≥ 1: CV ≤ 1
        return mu, shape

    def phi_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and Weibull shape of Φ, (K,) each."""
        mu = F.relu(self.phi)  # (K,)
        shape = 1.0 + F.softplus(self.phi_shape_net(mu.unsqueeze(-1)).squeeze(-1)).clamp(1e-6, 1e4)  # (K,)
        return mu, shape

    def forward(self, features: torch.Tensor, mode: Mode | str = Mode.MEAN) -> torch.Tensor:
        """Rewards (B,) = θᵀΦ + b with θ, Φ at their means or drawn once (one Φ for the whole batch)."""
        with torch.autocast(features.device.type, enabled=False):  # lgamma/exp/log in fp32, as the code does
            return self._forward(features, Mode(mode))

    def _forward(self, features: torch.Tensor, mode: Mode) -> torch.Tensor:
        mu_th, k_th = self.theta_params(features)
        mu_phi, k_phi = self.phi_params()
        lam_th, lam_phi = weibull_scale(k_th, mu_th), weibull_scale(k_phi, mu_phi)
        if mode is Mode.SAMPLE:
            theta, phi = weibull_rsample(k_th, lam_th), weibull_rsample(k_phi, lam_phi)  # (B, K), (K,)
        else:
            theta, phi = mu_th, mu_phi
        if self.training:
            a, b = self.cfg.prior_shape, self.cfg.prior_rate
            self.last_kl = {"theta": kl_weibull_gamma(k_th, lam_th, a, b).sum(-1),  # (B,) per response
                            "phi": kl_weibull_gamma(k_phi, lam_phi, a, b).sum()}
        return theta @ phi + self.bias  # (B,)

    def kl_loss(self, n_data: int) -> torch.Tensor:
        """η (KL_θ of a pair's two responses + KL_Φ / N): the ELBO's KL per pair (Eq. 9) for the last forward.

        The last training forward must have scored the 2B responses of B pairs; the stash is consumed.
        """
        if not self.last_kl:
            raise RuntimeError("kl_loss needs a training-mode forward first")
        kl_th, kl_phi = self.last_kl["theta"], self.last_kl["phi"]
        self.last_kl = {}
        per_pair_theta = 2.0 * kl_th.mean()  # rows are the chosen and rejected responses of each pair
        scale = 1.0 / n_data if KLPhiScale(self.cfg.kl_phi_scale) is KLPhiScale.DATASET else 1.0
        self.kl_log = {"kl_theta": float(kl_th.detach().mean()), "kl_phi": float(kl_phi.detach())}
        return self.cfg.eta * (per_pair_theta + scale * kl_phi)

    def phi_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E_q[Φ] and Var_q[Φ], (K,) each, float64."""
        mu_phi, k_phi = (t.double() for t in self.phi_params())
        return mu_phi, weibull_var(k_phi, weibull_scale(k_phi, mu_phi))

    def posterior(self, features: torch.Tensor) -> Posterior:
        """Posterior moments in float64 (the Weibull variance cancels badly in float32 for large shapes)."""
        mu_th, k_th = (t.double() for t in self.theta_params(features))
        return Posterior(mu_th, weibull_var(k_th, weibull_scale(k_th, mu_th)), *self.phi_moments())

    def moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean and variance of r, (B,) each, float64 (`bnrm_reward_moments` + b)."""
        p = self.posterior(features)
        mean, var = bnrm_reward_moments(p.mu_theta, p.var_theta, p.mu_phi, p.var_phi)
        return mean + self.bias.double(), var

    has_moments = True

    def regularizer(self, n_data: int) -> torch.Tensor:
        """The per-pair ELBO KL term of the last training forward (`kl_loss`)."""
        return self.kl_loss(n_data)

    def pair_moments(self, f_w: torch.Tensor, f_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[Δ], Var[Δ]) per pair, Var[Δ] = Var r_w + Var r_l − 2 Cov (the shared Φ), float64."""
        (mw, vw), (ml, vl) = self.moments(f_w), self.moments(f_l)
        cov = pair_covariance(self.theta(f_w).double(), self.theta(f_l).double(), self.phi_moments()[1])
        return mw - ml, vw + vl - 2.0 * cov

    def theta(self, features: torch.Tensor) -> torch.Tensor:
        """Factor activations E_q[θ] (B, K): how much each response loads on each factor."""
        return self.theta_params(features)[0]
