"""KFAC curvature of the Bradley–Terry likelihood over LoRA weights, and its Kronecker spectral algebra
(Yang et al. 2024; derivation in shared/papers/laplace-lora.md, cited below as §N).

Pure functions over eigen-decomposed Kronecker factors (variance, log-determinant, effective dimension, the
Laplace evidence), the forward/backward hooks that give per-row Jacobians without forming them, and the
accumulation of the factors G, A (`kfac_factors`) or of the head's exact GGN (`head_ggn`) over pair batches.
`laplace` builds posteriors from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bayesrm.batching import pair_batches
from bayesrm.config import KFACVariant, LaplaceConfig
from bayesrm.data import Pair
from bayesrm.losses import bt_ggn_weight, pair_nll
from bayesrm.model import RewardModel

# --------------------------------------------------------------------------- pure maths


def factor_eig(F_: torch.Tensor, rank: int | None = None, trace_complement: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eigenpairs of a symmetric PSD factor in fp64, descending, clamped ≥ 0, optionally top-`rank` (§4).

    Returns (eigvals (k,), eigvecs (d, k), ρ) where ρ is the eigenvalue given to the d − k dropped
    directions: 0, or (tr F − Σ kept)/(d − k) with `trace_complement` (shared/papers/laplace-lora.md §4).
    """
    Fd = F_.double()
    Fd = 0.5 * (Fd + Fd.T)
    vals, vecs = torch.linalg.eigh(Fd)
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1).contiguous()
    d = vals.numel()
    if rank is None or rank >= d:
        return vals, vecs, 0.0
    rho = float(vals[rank:].sum() / (d - rank)) if trace_complement else 0.0
    return vals[:rank].contiguous(), vecs[:, :rank].contiguous(), rho  # same layout as after save/load


def spectrum_grid(g_vals: torch.Tensor, g_dim: int, g_rho: float, a_vals: torch.Tensor, a_dim: int,
                  a_rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker eigenvalue products λ_Gi λ_Aj on the (k_G+1)×(k_A+1) grid, and their multiplicities (§4)."""
    g = torch.cat([g_vals, g_vals.new_tensor([g_rho])])
    a = torch.cat([a_vals, a_vals.new_tensor([a_rho])])
    gm = torch.cat([torch.ones_like(g_vals), g_vals.new_tensor([g_dim - g_vals.numel()])])
    am = torch.cat([torch.ones_like(a_vals), a_vals.new_tensor([a_dim - a_vals.numel()])])
    return torch.outer(g, a), torch.outer(gm, am)


def project_jacobian(J: torch.Tensor, Ug: torch.Tensor, Ua: torch.Tensor) -> torch.Tensor:
    """Squared norms of Ĵ = U_Gᵀ J U_A per eigen-grid cell, (B, k_G+1, k_A+1), last row/col = complement (§4).

    Ĵ = U_Gᵀ J U_A gives the kept×kept cells; the complement cells hold what the kept bases miss.
    """
    J = J.to(Ug.dtype)
    P = torch.einsum("ok,boi->bki", Ug, J)  # (B, kG, i)
    Q = torch.einsum("boi,ij->boj", J, Ua)  # (B, o, kA)
    Jh = torch.einsum("bki,ij->bkj", P, Ua)  # (B, kG, kA)
    S_rr = Jh.square()
    row = P.square().sum(-1)  # (B, kG): ‖(U_Gᵀ J)_{k,:}‖²
    col = Q.square().sum(-2)  # (B, kA): ‖(J U_A)_{:,j}‖²
    total = J.square().sum((-1, -2))  # (B,)
    s_rc = (row - S_rr.sum(-1)).clamp_min(0.0)  # kept G × complement A
    s_cr = (col - S_rr.sum(-2)).clamp_min(0.0)  # complement G × kept A
    s_cc = (total - row.sum(-1) - col.sum(-1) + S_rr.sum((-1, -2))).clamp_min(0.0)
    top = torch.cat([S_rr, s_rc.unsqueeze(-1)], dim=-1)  # (B, kG, kA+1)
    bottom = torch.cat([s_cr, s_cc.unsqueeze(-1)], dim=-1).unsqueeze(-2)  # (B, 1, kA+1)
    return torch.cat([top, bottom], dim=-2)


def kron_variance(S: torch.Tensor, lam: torch.Tensor, tau: float, temperature: float = 1.0) -> torch.Tensor:
    """Linearised variance Σ_ij Ĵ_ij² / (λ_Gi λ_Aj / T + τ) (Immer et al. 2021; laplace-lora.md §7)."""
    return (S / (lam / temperature + tau)).sum((-1, -2))


def kron_logdet_ratio(lam: torch.Tensor, mult: torch.Tensor, tau: float, temperature: float = 1.0) -> torch.Tensor:
    """log det P − log det P0 = Σ mult · log1p(λλ / (T τ)) (MacKay 1992; laplace-lora.md §5)."""
    return (mult * torch.log1p(lam / (temperature * tau))).sum()


def effective_dim(lam: torch.Tensor, mult: torch.Tensor, tau: float, temperature: float = 1.0) -> torch.Tensor:
    """γ = Σ mult · (λλ/T) / (λλ/T + τ), the number of well-determined parameters (MacKay 1992; §6)."""
    x = lam / temperature
    return (mult * x / (x + tau)).sum()


def laplace_log_marglik(log_lik: float, logdet_ratio: torch.Tensor, scatter: torch.Tensor,
                        tau: torch.Tensor) -> torch.Tensor:
    """Laplace evidence log p(D|τ) ≈ log p(D|θ*) − ½(Σ log det P_m/P0_m + Σ τ_m ‖θ*_m − μ0_m‖²) (§5)."""
    return log_lik - 0.5 * (logdet_ratio.sum() + (tau * scatter).sum())


# --------------------------------------------------------------------------- hooks


def lora_modules(model: RewardModel) -> dict[str, nn.Linear]:
    """The `lora_A` / `lora_B` linear modules of the active adapter, keyed by their weight's name (§0)."""
    out: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (".lora_A." in name or ".lora_B." in name) and mod.weight.requires_grad:
            out[name + ".weight"] = mod
    if not out:
        raise ValueError("model has no trainable LoRA modules")
    return out


@dataclass
class _Capture:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T, i)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T, o)


@contextmanager
def capture_lora_io(modules: dict[str, nn.Linear]) -> Iterator[_Capture]:
    """Record each LoRA module's input a_t and output o_t = W a_t during a forward pass (§0, §7)."""
    cap = _Capture()
    handles = []
    for name, mod in modules.items():
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            cap.inputs[name] = inp[0].detach()
            cap.outputs[name] = out
        handles.append(mod.register_forward_hook(hook))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def _up(t: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (bf16 models), keeping fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def batch_jacobians(model: RewardModel, modules: dict[str, nn.Linear], x: torch.Tensor, m: torch.Tensor,
                     weights: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rewards (B,), per-token inputs a (B,T,i) and output gradients δ (B,T,o) for every LoRA module.

    One forward and one backward of Σ_b c_b r_b, with c = `weights(r)` (default 1); rows never interact,
    so row b's δ is c_b ∂r_b/∂o. Pads are masked to zero in both a and δ.
    """
    with torch.enable_grad(), capture_lora_io(modules) as cap:
        r = _up(model(x, m))  # (B,)
        c = torch.ones_like(r) if weights is None else weights(r.detach())
        names = list(modules)
        grads = torch.autograd.grad((c * r).sum(), [cap.outputs[n] for n in names], allow_unused=True)
    mask = m.unsqueeze(-1)  # (B, T, 1)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        """(B, T, ·) with pads zeroed; a module that sees one vector per row (e.g. BERT's pooler, which a LoRA
        target "dense" also matches) counts as a single always-real token."""
        return _up(t) * mask if t.dim() == 3 else _up(t).unsqueeze(1)

    a = {n: tokens(cap.inputs[n]) for n in names}
    g = {}
    for n, gr in zip(names, grads, strict=True):
        g[n] = tokens(torch.zeros_like(cap.outputs[n].detach()) if gr is None else gr)
    return r.detach(), a, g


def head_features(model: RewardModel, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B,) and the head's exact Jacobian φ = f (B, d) w.r.t. w, since r = wᵀf + b with b frozen (§7)."""
    head = require_linear_head(model)
    with torch.no_grad():
        f = _up(model.features(x, m))  # (B, d)
        r = _up(head(f.to(head.weight.dtype))).squeeze(-1)  # (B,)
    return r, f


@contextmanager
def capture_head_input(model: RewardModel) -> Iterator[list[torch.Tensor]]:
    """Record the head's input f (B, d), its exact Jacobian φ (`head_features`), during a forward pass."""
    got: list[torch.Tensor] = []
    handle = require_linear_head(model).register_forward_hook(
        lambda _m, inp, _out: got.append(_up(inp[0].detach())))
    try:
        yield got
    finally:
        handle.remove()


def head_theta(model: RewardModel) -> torch.Tensor:
    """The head's weight as one (1, d) row, the variable of the head-only posterior (r = w·φ + b, b frozen)."""
    return require_linear_head(model).weight.detach()


def head_prior_mean(model: RewardModel, cfg: LaplaceConfig) -> torch.Tensor:
    """Prior mean of the head weight: its initialisation under prior_mean='init' (as for LoRA A), else 0 (§5)."""
    init = getattr(model, "head_init", None)
    theta = head_theta(model)
    if cfg.prior_mean == "init" and init is not None:
        return init.detach().double().cpu().reshape(theta.shape)
    return torch.zeros_like(theta, dtype=torch.double, device="cpu")


def require_linear_head(model: RewardModel) -> nn.Linear:
    """The model's scalar head; ValueError for a BNRM head, which this posterior does not cover."""
    if not isinstance(model.head, nn.Linear):
        raise ValueError(f"Laplace-LoRA needs the linear BT head, this model has a '{model.config.head}' head; a BNRM "
                         "head has its own variational posterior: use RewardModel.predict_moments")
    return model.head


# --------------------------------------------------------------------------- curvature


def _sum_device(model: RewardModel) -> torch.device:
    """Where fp64 curvature sums accumulate: the model's GPU (one copy to the host at the end instead of one per
    batch: 17 GB of d × d factors per batch at 7B), else the CPU (MPS has no fp64)."""
    return model.device if model.device.type == "cuda" else torch.device("cpu")


def kfac_factors(model: RewardModel, pairs: Sequence[Pair], variant: KFACVariant | str = KFACVariant.PAIR,
                 batch_size: int = 8, progress: Callable[[int], None] | None = None, margin: float = 0.0,
                 center_coef: float = 0.0, reduce: Callable[[Any], Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """KFAC factors G_m, A_m with G ⊗ A ≈ the exact BT GGN block Σ_n Λ_n vec(J_Δ)vec(J_Δ)ᵀ (§3), and log p(D|θ*).

    Λ_n = `bt_ggn_weight`(Δ_n, m). PAIR: with J̃_n = √Λ_n J_Δ,n = Σ_{s,t} g aᵀ (o × i), G = Σ_n J̃ J̃ᵀ and
    A = Σ_n J̃ᵀ J̃ / Σ_n ‖J̃‖², the first power-iteration step towards the Frobenius-optimal Kronecker
    factorisation (Shampoo's factors; Morwani et al. 2024): tr(G ⊗ A) is exact, it is exact when every J_Δ is
    rank one (LoRA r = 1), and unlike the per-response variants it keeps the −J_wᵀJ_l cross term, which a shared
    prompt makes large; with centering, the rows √(2c)·(J_w + J_l) join the J̃. REDUCE (one backward of
    Σ_n stopgrad(√Λ_n)·Δ_n, so hooks see g = √Λ_n · c_s · δ): G = Σ_{n,s} ĝ ĝᵀ, A = (1/2N) Σ ā āᵀ with
    ĝ = Σ_t g_t, ā = mean over real tokens of a_t. EXPAND: G = Σ_{n,s,t} g gᵀ, A = (1/M) Σ a aᵀ over M real tokens.
    `reduce` (e.g. `dist.all_reduce_sum`) sums every accumulated statistic over processes before A is normalised.
    """
    var = KFACVariant(variant)
    if center_coef and var is not KFACVariant.PAIR:
        raise ValueError(f"the centering curvature needs kfac='pair', got {var.value!r}")
    modules = lora_modules(model)
    model.eval()
    dev = _sum_device(model)
    G = {k: torch.zeros(m.out_features, m.out_features, dtype=torch.double, device=dev) for k, m in modules.items()}
    A = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.double, device=dev) for k, m in modules.items()}
    norm = dict.fromkeys(modules, 0.0)  # what A is divided by: rows, tokens, or Σ ‖J̃‖² (PAIR)
    log_lik = 0.0
    for B, x, m in pair_batches(model, pairs, batch_size):

        def weights(r: torch.Tensor, B: int = B) -> torch.Tensor:
            lam = bt_ggn_weight(r[:B] - r[B:], margin)
            return torch.cat([lam.sqrt(), -lam.sqrt()])

        r, a, g = batch_jacobians(model, modules, x, m, None if var is KFACVariant.PAIR else weights)
        log_lik += float(-pair_nll(r[:B], r[B:], margin, center_coef).double().sum())
        mask = m.double()  # (2B, T)
        if var is KFACVariant.PAIR:
            lam = bt_ggn_weight(r[:B] - r[B:], margin).double().sqrt()[:, None, None]  # (B, 1, 1)
        for k in modules:
            if var is KFACVariant.PAIR:
                Jr = torch.einsum("bto,bti->boi", g[k], a[k]).double()  # (2B, o, i) per-response Jacobians
                J = lam.to(Jr.device) * (Jr[:B] - Jr[B:])  # J̃ = √Λ (J_w − J_l)
                if center_coef:
                    J = torch.cat([J, math.sqrt(2.0 * center_coef) * (Jr[:B] + Jr[B:])])  # √(2c) J_s
                G[k] += torch.einsum("boi,bpi->op", J, J)
                A[k] += torch.einsum("boi,boj->ij", J, J)
                norm[k] += float(J.square().sum())
            elif var is KFACVariant.REDUCE:
                gh = g[k].sum(1).double()  # (2B, o)
                ab = a[k].sum(1).double() / mask.sum(1, keepdim=True)  # (2B, i)
                G[k] += gh.T @ gh
                A[k] += ab.T @ ab
                norm[k] += 2 * B
            else:
                gt = g[k].reshape(-1, g[k].shape[-1]).double()  # (2B·T, o)
                at = a[k].reshape(-1, a[k].shape[-1]).double()  # (2B·T, i)
                G[k] += gt.T @ gt
                A[k] += at.T @ at
                norm[k] += float(mask.sum())
        if progress is not None:
            progress(B)
    G, A = {k: v.cpu() for k, v in G.items()}, {k: v.cpu() for k, v in A.items()}
    if reduce is not None:  # each process holds sums over its shard of the pairs
        G, A, norm, log_lik = reduce((G, A, norm, log_lik))
    for k in A:
        A[k] /= norm[k] if norm[k] > 0 else 1.0
    return G, A, log_lik


def head_ggn(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 8,
             progress: Callable[[int], None] | None = None, margin: float = 0.0, center_coef: float = 0.0,
             reduce: Callable[[Any], Any] | None = None) -> tuple[torch.Tensor, float]:
    """Exact BT GGN of the head weight Σ_n Λ_n Δφ Δφᵀ + 2c Σ_n (φ_w + φ_l)(φ_w + φ_l)ᵀ, φ = f (§2); log p(D|θ*).

    `reduce` sums the GGN and log-likelihood over processes (each holding its shard of the pairs)."""
    model.eval()
    d = require_linear_head(model).in_features
    ggn = torch.zeros(d, d, dtype=torch.double, device=_sum_device(model))
    log_lik = 0.0
    for B, x, m in pair_batches(model, pairs, batch_size):
        r, phi = head_features(model, x, m)  # (2B,), (2B, d)
        lam = bt_ggn_weight(r[:B] - r[B:], margin).double()  # (B,)
        dphi = (phi[:B] - phi[B:]).double()  # (B, d)
        part = (dphi.T * lam) @ dphi  # (d, d)
        if center_coef:
            sphi = (phi[:B] + phi[B:]).double()
            part = part + 2.0 * center_coef * sphi.T @ sphi
        ggn += part
        log_lik += float(-pair_nll(r[:B], r[B:], margin, center_coef).double().sum())
        if progress is not None:
            progress(B)
    ggn = ggn.cpu()
    if reduce is not None:
        ggn, log_lik = reduce((ggn, log_lik))
    return ggn, log_lik
