"""Reward heads trained on cached backbone features: linear and MLP heads, vectorised M-member ensembles, and the
head-only Laplace posterior with the exact (dense) GGN of the BT likelihood.

A `HeadStack` holds M heads as stacked tensors, so the forward and backward of all members is one batched einsum.
Members are independent: member i is initialised and shuffled from its own generator (seed + i) and its loss enters
the sum separately, so with Adam (elementwise) the stack trains exactly as M separate single-head runs would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesrm.config import HeadConfig, HeadKind, LaplaceConfig, LaplaceParams, TauMethod
from bayesrm.data import DataError
from bayesrm.features import PairFeatures
from bayesrm.integrity import (
    CHECKSUMS_KEY,
    load_tensors,
    one_line,
    require_finite,
    tensor_checksums,
    verify_checksums,
)
from bayesrm.io import atomic_dir
from bayesrm.laplace import HEAD_KEY, KronBlock, LaplacePosterior, factor_eig
from bayesrm.losses import bradley_terry_loss, bt_ggn_weight
from bayesrm.run import POSTERIOR_DIR

HEADS_NAME = "heads.safetensors"
HEADS_CONFIG = "heads.json"
BACKBONE_KEY = "backbone_sha256"  # heads.json: `features.weights_fingerprint` of the backbone the features came from
STANDARDIZATION_KEY = "standardization"  # heads.json: per-member reward mean/std on the training responses
_DATA_SEED = 1_000_003  # member i shuffles with seed _DATA_SEED·(seed + i) + 1, apart from its init stream


def dense_ggn(jac_delta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Exact BT GGN Σ_n Λ_n J_Δ,n J_Δ,nᵀ from pair Jacobians J_Δ = ∂(r_w − r_l)/∂θ (N, P) and Δ (N,), (P, P) (§2)."""
    lam = bt_ggn_weight(delta).to(jac_delta.dtype)  # (N,) Λ = p(1 − p)
    return (jac_delta.T * lam) @ jac_delta


class HeadStack(nn.Module):
    """M heads as stacked parameters; `forward(f)` maps features (N, d) or (M, N, d) to rewards (M, N)."""

    def __init__(self, d: int, cfg: HeadConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.d = cfg, d
        M, h = cfg.members, cfg.hidden
        gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(M)]
        if HeadKind(cfg.kind) is HeadKind.LINEAR:  # as RewardModel's head: N(0, 1/(d+1))
            self.w = nn.Parameter(torch.stack([torch.randn(d, generator=g, dtype=dtype) for g in gens])
                                  / (d + 1) ** 0.5)  # (M, d)
        else:  # nn.Linear's default U(±1/√fan_in) for both layers
            layers = [[(torch.rand(d, h, generator=g, dtype=dtype) * 2 - 1) / d**0.5,
                       (torch.rand(h, generator=g, dtype=dtype) * 2 - 1) / d**0.5,
                       (torch.rand(h, generator=g, dtype=dtype) * 2 - 1) / h**0.5] for g in gens]
            self.W1 = nn.Parameter(torch.stack([x[0] for x in layers]))  # (M, d, h)
            self.b1 = nn.Parameter(torch.stack([x[1] for x in layers]))  # (M, h)
            self.w = nn.Parameter(torch.stack([x[2] for x in layers]))  # (M, h)

    @property
    def is_mlp(self) -> bool:
        return HeadKind(self.cfg.kind) is HeadKind.MLP

    def last_inputs(self, f: torch.Tensor) -> torch.Tensor:
        """Input of the last linear layer per member, (M, N, k): the features, or the MLP's hidden activations."""
        f = f.to(self.w.dtype)
        if not self.is_mlp:
            return f.expand(self.cfg.members, *f.shape) if f.dim() == 2 else f
        eq = "nd,mdh->mnh" if f.dim() == 2 else "mnd,mdh->mnh"
        return torch.relu(torch.einsum(eq, f, self.W1) + self.b1[:, None])  # (M, N, h)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Rewards (M, N) of every member; `f` is shared (N, d) or per member (M, N, d)."""
        return torch.einsum("mnk,mk->mn", self.last_inputs(f), self.w)

    def l2_norms(self) -> torch.Tensor:
        """‖θ_m‖² per member, (M,)."""
        return sum((p.square().flatten(1).sum(1) for p in self.parameters()), torch.zeros(self.cfg.members,
                                                                                      dtype=self.w.dtype))

    def flat_params(self, which: LaplaceParams | str = LaplaceParams.LAST) -> torch.Tensor:
        """Member parameters as rows (M, P) in `pair_jacobian`'s order (no last-layer bias: BT cannot see it)."""
        if LaplaceParams(which) is LaplaceParams.LAST or not self.is_mlp:
            return self.w.detach()
        return torch.cat([self.W1.flatten(1), self.b1, self.w], 1).detach()

    def response_jacobian(self, f: torch.Tensor, member: int = 0,
                          which: LaplaceParams | str = LaplaceParams.LAST) -> torch.Tensor:
        """J = ∂r/∂θ of one member per response, (N, P), analytic; θ as in `flat_params`."""
        with torch.no_grad():
            a = self.last_inputs(f)[member]  # (N, k)
            if LaplaceParams(which) is LaplaceParams.LAST or not self.is_mlp:
                return a
            g = self.w[member] * (a > 0).to(a.dtype)  # ∂r/∂b₁ = w₂ ⊙ relu'(z), (N, h)
            return torch.cat([torch.einsum("nd,nh->ndh", f.to(a.dtype), g).flatten(1), g, a], 1)

    def pair_jacobian(self, fw: torch.Tensor, fl: torch.Tensor, member: int = 0,
                      which: LaplaceParams | str = LaplaceParams.LAST) -> torch.Tensor:
        """J_Δ = ∂(r_w − r_l)/∂θ of one member, (N, P) = J(f_w) − J(f_l)."""
        return self.response_jacobian(fw, member, which) - self.response_jacobian(fl, member, which)

    def reward_statistics(self, f: torch.Tensor) -> dict[str, list[float]]:
        """Per-member mean and std (ddof 0) of the rewards of features `f` (N, d): standardisation statistics."""
        with torch.no_grad():
            r = self(f).double()  # (M, N)
        return {"mean": r.mean(1).tolist(), "std": r.std(1, correction=0).clamp_min(1e-12).tolist()}


def train_heads(feats: PairFeatures, cfg: HeadConfig, log: Callable[[str], None] | None = None) -> HeadStack:
    """Train M heads on cached features with the BT loss (losses.bradley_terry_loss) + (l2/2)‖θ‖², Adam."""
    fw, fl = feats.chosen, feats.rejected
    n, d = fw.shape
    stack = HeadStack(d, cfg, fw.dtype)
    opt = torch.optim.Adam(stack.parameters(), lr=cfg.lr)
    gens = [torch.Generator().manual_seed(_DATA_SEED * (cfg.seed + i) + 1) for i in range(cfg.members)]
    for epoch in range(cfg.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (M, N): each member's data order
        total = torch.zeros(cfg.members, dtype=fw.dtype)
        for s in range(0, n, cfg.batch_size):
            idx = order[:, s:s + cfg.batch_size]  # (M, B)
            delta_w, delta_l = stack(fw[idx]), stack(fl[idx])  # (M, B) each
            loss = bradley_terry_loss(delta_w, delta_l).mean(1) + 0.5 * cfg.l2 * stack.l2_norms()  # (M,)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # members do not interact: each gets its own gradient
            opt.step()
            total += loss.detach() * idx.shape[1] / n
        if log is not None and (epoch + 1) % max(cfg.epochs // 5, 1) == 0:
            log(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {float(total.mean()):.4f}")
    stack.eval()
    return stack


def fit_head_laplace(stack: HeadStack, feats: PairFeatures, cfg: LaplaceConfig | None = None, member: int = 0,
                     which: LaplaceParams | str = LaplaceParams.LAST, max_params: int = 8192,
                     prior_mean: torch.Tensor | None = None) -> LaplacePosterior:
    """Laplace posterior of one member's head from the exact dense GGN Σ Λ J_Δ J_Δᵀ in float64.

    Stored as the single block 1 ⊗ GGN (as `fit_laplace(subset="head")`), so τ by marginal likelihood, MacKay or a
    fixed value comes from `LaplacePosterior.optimize_prior_precision` unchanged. The prior mean is 0, the centre of
    the l2 prior the heads were trained under, unless `prior_mean` (1, P) is given.
    """
    cfg = cfg or LaplaceConfig(subset="head", prior_structure="global")
    if TauMethod(cfg.tau_method) is TauMethod.VAL_NLL:
        raise ValueError("the fast path tunes τ by marglik, mackay or fixed; val_nll needs validation pairs")
    if cfg.margin or cfg.center_coef:
        raise ValueError("heads train with the plain BT loss: margin and center_coef must be 0")
    J = stack.pair_jacobian(feats.chosen, feats.rejected, member, which).double()  # (N, P)
    if J.shape[1] > max_params:
        raise ValueError(f"dense GGN over {J.shape[1]} head parameters exceeds max_params={max_params}; use "
                         "which='last' or a narrower head")
    with torch.no_grad():
        r = stack(torch.cat([feats.chosen, feats.rejected]))[member].double()  # (2N,)
    delta = r[: len(feats)] - r[len(feats):]
    ggn = dense_ggn(J, delta)  # (P, P)
    log_lik = float(-bradley_terry_loss(delta, torch.zeros_like(delta)).sum())
    av, aU, _ = factor_eig(ggn)
    theta = stack.flat_params(which)[member:member + 1].double()  # (1, P)
    one = torch.ones(1, dtype=torch.double)
    mu0 = torch.zeros_like(theta) if prior_mean is None else prior_mean.detach().double().cpu().reshape(theta.shape)
    block = KronBlock(one, torch.ones(1, 1, dtype=torch.double), 0.0, av, aU, 0.0, theta, mu0)
    post = LaplacePosterior({HEAD_KEY: block}, cfg, len(feats), log_lik)
    post.optimize_prior_precision()
    return post


def predict_pairs(stack: HeadStack, feats: PairFeatures, post: LaplacePosterior | None = None,
                  which: LaplaceParams | str = LaplaceParams.LAST) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_Δ, Var Δ) per pair, float64: Laplace J_Δ Σ J_Δᵀ for member 0 when `post` is given, else the members'
    mean and spread (ddof 0, zero for M = 1)."""
    with torch.no_grad():
        deltas = (stack(feats.chosen) - stack(feats.rejected)).double()  # (M, N)
    if post is None:
        return deltas.mean(0), deltas.var(0, correction=0)
    J = stack.pair_jacobian(feats.chosen, feats.rejected, 0, which).double()  # (N, P)
    var, _ = post.jacobian_variance({HEAD_KEY: J.unsqueeze(1)})
    return deltas[0], var


# --------------------------------------------------------------------------- saved heads


def save_heads(path: str | Path, stack: HeadStack, model_config: dict[str, Any], post: LaplacePosterior | None,
               info: dict[str, Any], laplace_params: LaplaceParams | str = LaplaceParams.LAST) -> None:
    """Write heads (safetensors), their config + the backbone's RMConfig (json) and the posterior, atomically."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in stack.state_dict().items()}, str(tmp / HEADS_NAME))
        meta = {"format_version": 1, "head": asdict(stack.cfg), "d": stack.d, "model": model_config,
                "laplace_params": LaplaceParams(laplace_params).value, **info,
                CHECKSUMS_KEY: tensor_checksums(tmp)}
        (tmp / HEADS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if post is not None:
            post.save(tmp / POSTERIOR_DIR)


def is_heads_dir(path: str | Path) -> bool:
    """True when `path` holds heads written by `save_heads`."""
    return (Path(path) / HEADS_CONFIG).exists()


def load_heads(path: str | Path) -> tuple[HeadStack, dict[str, Any], LaplacePosterior | None]:
    """(heads, metadata, posterior or None) from a directory written by `save_heads`; checksums verified."""
    p = Path(path)
    if not is_heads_dir(p):
        raise FileNotFoundError(f"{p}: no {HEADS_CONFIG} (not a fast-heads directory)")
    try:
        meta = json.loads((p / HEADS_CONFIG).read_text())
        stack = HeadStack(int(meta["d"]), HeadConfig.from_dict(meta["head"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"damaged fast-heads config ({one_line(e)})", file=str(p / HEADS_CONFIG)) from None
    verify_checksums(p, meta, p / HEADS_CONFIG, required=[HEADS_NAME])
    tensors = load_tensors(p / HEADS_NAME)
    require_finite(tensors, p / HEADS_NAME)
    try:
        stack.load_state_dict(tensors)
    except RuntimeError as e:
        raise DataError(f"heads do not match {HEADS_CONFIG} ({one_line(e)})", file=str(p / HEADS_NAME)) from None
    stack.eval()
    post = LaplacePosterior.load(p / POSTERIOR_DIR) if (p / POSTERIOR_DIR / "posterior.json").exists() else None
    return stack, meta, post


class FeatureHeads:
    """Saved fast heads on the frozen backbone they were trained on: per-response rewards and σ for `Scorer`.

    One member (M = 1) is a single reward model (`map`, and `la` when the heads carry a Laplace posterior); M > 1
    members are an ensemble (`ens:*`), their rewards standardised with the statistics `bayesrm heads` stored.
    """

    def __init__(self, backbone: Any, stack: HeadStack, meta: dict[str, Any], posterior: LaplacePosterior | None,
                 source: Path) -> None:
        self.backbone, self.stack, self.meta, self.posterior, self.source = backbone, stack, meta, posterior, source
        self.which = LaplaceParams(meta.get("laplace_params", LaplaceParams.LAST.value))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> FeatureHeads:
        """Heads, posterior and their backbone; DataError when the backbone's weights are not the ones trained on."""
        from bayesrm.features import weights_fingerprint
        from bayesrm.model import RewardModel, RMConfig

        stack, meta, post = load_heads(path)
        backbone = RewardModel(RMConfig.from_dict(meta["model"]))
        want = meta.get(BACKBONE_KEY)
        if want is not None and weights_fingerprint(backbone) != want:
            raise DataError(f"the backbone {backbone.config.backbone!r} loaded here has other weights than the one "
                            "these heads were trained on", file=str(Path(path) / HEADS_CONFIG))
        return cls(backbone if device is None else backbone.to(device), stack, meta, post, Path(path))

    def __len__(self) -> int:
        return self.stack.cfg.members

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def config(self) -> Any:
        """The backbone's RMConfig (template, max_length: what the server's token counts use)."""
        return self.backbone.config

    def moments(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                progress: Callable[[int], None] | None = None, variance: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards (M, N) (members standardised when M > 1), and with `variance` member 0's Laplace J Σ Jᵀ (1, N)."""
        from bayesrm.objectives import standardize

        f = self.backbone.per_response(prompts, responses, lambda x: x, batch_size, progress).to(self.stack.w.dtype)
        with torch.no_grad():
            r = self.stack(f).double()  # (M, N)
        if variance:
            if self.posterior is None:
                raise ValueError(f"{self.source}: these heads have no Laplace posterior (trained with --no-laplace)")
            var, _ = self.posterior.jacobian_variance(
                {HEAD_KEY: self.stack.response_jacobian(f, 0, self.which).double().unsqueeze(1)})
            return r[:1], var.unsqueeze(0)
        if len(self) > 1:
            stats = self.meta.get(STANDARDIZATION_KEY)
            if stats is None:
                raise ValueError(f"{self.source}: no standardisation statistics in {HEADS_CONFIG}; ensemble specs "
                                 "need them (heads saved by an older bayesrm: rerun `bayesrm heads`)")
            r = standardize(r, torch.tensor(stats["mean"], dtype=torch.double),
                            torch.tensor(stats["std"], dtype=torch.double))
        return r, None
