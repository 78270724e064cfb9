"""Laplace-LoRA for Bradley–Terry reward models (Yang et al. 2024; derivation in shared/papers/laplace-lora.md,
cited below as §N).

The posterior over every LoRA tensor θ_m (each `lora_A` and `lora_B` weight) is Gaussian at the MAP with
precision P_m = G_m ⊗ A_m / T + τ_m I (a Kronecker factorisation of the BT GGN; see `kfac.kfac_factors`), stored
as eigendecompositions, optionally rank-k on the large side. Rewards are predicted with the linearised model:
r ~ N(r_MAP, J Σ Jᵀ), computed from one forward and one backward pass with hooks, never forming J.
`subset="head"` is a last-layer baseline: the exact GGN over the scalar head's weight w with full covariance,
stored as the single block 1 ⊗ GGN so that every formula below applies unchanged (the head bias is frozen at 0:
BT sees only differences, so it is not a parameter).

The likelihood is the one the model was trained with: p = σ(Δ − m) with a margin m, and the reward-centering
term c·(r_w + r_l)² adds its own curvature 2c·J_s J_sᵀ with J_s = J_w + J_l (`LaplaceConfig.margin`,
`center_coef`; `bayesrm laplace RUN` reads both from the run's train_config.json).

Spectral bookkeeping: each factor is kept as k eigenpairs plus a "complement" of the remaining d − k
directions with one shared eigenvalue ρ (0, or the trace-preserving mean of the dropped eigenvalues). The
Kronecker spectrum is then a (k_G+1) × (k_A+1) grid of eigenvalue products with multiplicities, and every
quantity (variance, log-det, effective dimension) is a weighted sum over that grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesrm import dist
from bayesrm.batching import pair_batches, scoring_batches
from bayesrm.config import LaplaceConfig, PriorStructure, Subset, TauMethod
from bayesrm.data import DataError, Pair, pair_hash, pairs_fingerprint
from bayesrm.integrity import (
    CHECKSUMS_KEY,
    load_tensors,
    require_finite,
    require_positive,
    tensor_checksums,
    verify_checksums,
)
from bayesrm.io import atomic_dir, json_text
from bayesrm.kfac import (
    batch_jacobians,
    capture_head_input,
    effective_dim,
    factor_eig,
    head_features,
    head_ggn,
    head_prior_mean,
    head_theta,
    kfac_factors,
    kron_logdet_ratio,
    kron_variance,
    laplace_log_marglik,
    lora_modules,
    project_jacobian,
    require_linear_head,
    spectrum_grid,
)
from bayesrm.model import RewardModel
from bayesrm.run import POSTERIOR_META, RunDir

HEAD_KEY = "head"  # block name of the head-only posterior over head.weight


# --------------------------------------------------------------------------- posterior


@dataclass
class KronBlock:
    """Eigen-decomposed KFAC block G ⊗ A of one LoRA tensor (weight shape o × i)."""

    g_vals: torch.Tensor  # (kG,)
    g_vecs: torch.Tensor  # (o, kG)
    g_rho: float
    a_vals: torch.Tensor  # (kA,)
    a_vecs: torch.Tensor  # (i, kA)
    a_rho: float
    theta: torch.Tensor  # MAP weights (o, i)
    mu0: torch.Tensor  # prior mean (o, i)

    @property
    def shape(self) -> tuple[int, int]:
        """(o, i) of the weight."""
        return int(self.g_vecs.shape[0]), int(self.a_vecs.shape[0])

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalue products λ_Gi λ_Aj and multiplicities of this block (§4)."""
        o, i = self.shape
        return spectrum_grid(self.g_vals, o, self.g_rho, self.a_vals, i, self.a_rho)


class LaplacePosterior:
    """Kronecker-factored Laplace posterior over a reward model's LoRA weights (or its head: `cfg.subset`)."""

    def __init__(self, blocks: dict[str, KronBlock], cfg: LaplaceConfig, n_data: int, log_lik: float) -> None:
        self.blocks = blocks
        self.cfg = cfg
        self.n_data = n_data
        self.log_lik = log_lik
        self.tau: dict[str, float] = {k: cfg.prior_precision for k in blocks}
        self._grids = {k: b.grid() for k, b in blocks.items()}
        self.head: torch.Tensor | None = None  # the model's head weight at the fit (check_matches compares it)
        self.source: Path | None = None  # the directory it was loaded from (named in errors)
        self.fitted_pairs: torch.Tensor | None = None  # (n_data,) int64 `pair_hash` of each pair it was fitted on
        self.data_fingerprint: str | None = None  # `pairs_fingerprint` of those pairs

    def record_data(self, pairs: Sequence[Pair]) -> None:
        """Remember which pairs the posterior was fitted on (hashes), so evaluation can refuse to be in-sample."""
        self.fitted_pairs = torch.tensor([pair_hash(p) for p in pairs], dtype=torch.int64)
        self.data_fingerprint = pairs_fingerprint(pairs)

    def fitted_fraction(self, pairs: Sequence[Pair]) -> float | None:
        """Fraction of `pairs` that the posterior was fitted on (None when it did not record them)."""
        if self.fitted_pairs is None or not pairs:
            return None
        seen = set(self.fitted_pairs.tolist())
        return sum(pair_hash(p) in seen for p in pairs) / len(pairs)

    # ------------------------------------------------------------------ evidence
    def scatter(self) -> dict[str, float]:
        """‖θ*_m − μ0_m‖² per tensor, the scatter term of the evidence (§5)."""
        return {k: float((b.theta.double() - b.mu0.double()).square().sum()) for k, b in self.blocks.items()}

    def log_marginal_likelihood(self, tau: dict[str, float] | float | None = None) -> float:
        """Laplace log evidence at prior precision τ (scalar or per tensor), §5; 2π terms cancel."""
        taus = self._taus(tau)
        T = self.cfg.temperature
        sc = self.scatter()
        logdet = torch.stack([kron_logdet_ratio(*self._grids[k], taus[k], T) for k in self.blocks])
        val = laplace_log_marglik(self.log_lik, logdet, torch.tensor([sc[k] for k in self.blocks], dtype=torch.double),
                                  torch.tensor([taus[k] for k in self.blocks], dtype=torch.double))
        return float(val)

    def _taus(self, tau: dict[str, float] | float | None) -> dict[str, float]:
        if tau is None:
            return self.tau
        if isinstance(tau, dict):
            return tau
        return {k: float(tau) for k in self.blocks}

    def optimize_prior_precision(self, method: TauMethod | str | None = None,
                                 structure: PriorStructure | str | None = None,
                                 val_data: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
                                 bounds: tuple[float, float] = (1e-6, 1e8)) -> dict[str, float]:
        """Choose τ by marginal likelihood (exact 1-D maximisation; separable per tensor), MacKay's fixed
        point, or a validation-NLL grid (`val_data` from `pair_cache`). Sets self.tau, returns a copy (§6)."""
        from scipy.optimize import minimize_scalar

        meth = TauMethod(method or self.cfg.tau_method)
        struct = PriorStructure(structure or self.cfg.prior_structure)
        T = self.cfg.temperature
        sc = self.scatter()
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        keys = list(self.blocks)
        groups = [[k] for k in keys] if struct is PriorStructure.LAYERWISE else [keys]
        if meth is TauMethod.FIXED:
            return dict(self.tau)
        if meth is TauMethod.VAL_NLL:
            if val_data is None:
                raise ValueError("tau_method 'val_nll' needs validation pairs")
            if struct is not PriorStructure.GLOBAL:
                raise ValueError("the validation grid tunes a global τ; use prior_structure='global'")
            mu, S = val_data
            grid = np.logspace(-4, 6, 101)
            nll = [self._val_nll(mu, S, float(t)) for t in grid]
            best = float(grid[int(np.argmin(nll))])
            self.tau = {k: best for k in keys}
            return dict(self.tau)
        for grp in groups:
            if all(sc[k] == 0 and float(self._grids[k][0].max()) <= 0 for k in grp):
                continue  # no curvature and θ* = μ0 (e.g. LoRA A before training): flat evidence, keep τ
            if meth is TauMethod.MARGLIK:
                def neg(log_t: float, grp: list[str] = grp) -> float:
                    t = math.exp(log_t)
                    return float(sum(0.5 * float(kron_logdet_ratio(*self._grids[k], t, T)) + 0.5 * t * sc[k]
                                     for k in grp))
                res = minimize_scalar(neg, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
                t_best = math.exp(float(res.x))
            else:  # MacKay fixed point
                t_best = self.tau[grp[0]]
                for _ in range(500):
                    gam = sum(float(effective_dim(*self._grids[k], t_best, T)) for k in grp)
                    new = min(max(gam / max(sum(sc[k] for k in grp), 1e-300), bounds[0]), bounds[1])
                    if abs(math.log(new) - math.log(t_best)) < 1e-10:
                        t_best = new
                        break
                    t_best = new
            for k in grp:
                self.tau[k] = t_best
        return dict(self.tau)

    def _val_nll(self, mu: torch.Tensor, S: dict[str, torch.Tensor], tau: float) -> float:
        var = sum(kron_variance(S[k], self._grids[k][0], tau, self.cfg.temperature) for k in self.blocks)
        p = torch.sigmoid(mu / torch.sqrt(1.0 + math.pi * torch.as_tensor(var) / 8.0))
        return float(-torch.log(p.clamp_min(1e-12)).mean())

    # ------------------------------------------------------------------ prediction
    def jacobians(self, model: RewardModel, x: torch.Tensor, m: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards (B,) and per-row Jacobians J_m = Σ_t δ_t a_tᵀ (B, o, i) of r w.r.t. each block (§7)."""
        require_linear_head(model)
        if Subset(self.cfg.subset) is Subset.HEAD:
            r, phi = head_features(model, x, m)
            return r, {HEAD_KEY: phi.unsqueeze(1)}  # (B, 1, d+1)
        r, a, g = batch_jacobians(model, lora_modules(model), x, m)
        return r, {k: torch.einsum("bto,bti->boi", g[k], a[k]) for k in self.blocks}

    def _variance_from(self, Js: dict[str, torch.Tensor], rows: torch.Tensor | None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-row variance and per-tensor grids S from Jacobians; `rows` (2, P) gives pair differences."""
        total: torch.Tensor | None = None
        S_all = {}
        for k, blk in self.blocks.items():
            J = Js[k]  # (B, o, i)
            if rows is not None:
                J = J[rows[0]] - J[rows[1]]  # J_Δ = J_w − J_l
            S = project_jacobian(J, blk.g_vecs.to(J.device), blk.a_vecs.to(J.device))
            S_all[k] = S
            v = kron_variance(S, self._grids[k][0].to(S.device), self.tau[k], self.cfg.temperature)
            total = v if total is None else total + v
        assert total is not None
        return total, S_all

    def jacobian_variance(self, Js: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Var = J Σ Jᵀ per row from Jacobians per block, (B, o, i) each (§7), and the τ-independent grids S."""
        return self._variance_from(Js, None)

    def predict(self, model: RewardModel, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearised predictive N(r_MAP, J Σ Jᵀ) per response (§7): (mean (N,), var (N,)) in input order."""
        return self.predict_ids(model, model.encode(prompts, responses), batch_size, progress)

    def predict_ids(self, model: RewardModel, ids: Sequence[Sequence[int]], batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict` on already tokenised inputs (e.g. shared by the members of an ensemble)."""
        model.eval()
        mean, var = torch.empty(len(ids), dtype=torch.double), torch.empty(len(ids), dtype=torch.double)
        for idx, x, m in scoring_batches(ids, batch_size, model.pad_id, model.device):
            r, J = self.jacobians(model, x, m)
            v, _ = self._variance_from(J, None)
            mean[idx], var[idx] = r.double().cpu(), v.double().cpu()
            if progress is not None:
                progress(len(idx))
        return mean, var

    def predict_ids_with_head(self, head: LaplacePosterior, model: RewardModel, ids: Sequence[Sequence[int]],
                              batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`predict_ids` of this LoRA posterior and of the head-only posterior `head` of the same model in one pass:
        (mean, var, var_head); the head's Jacobian φ (§7) is its input, captured on the LoRA pass's forward."""
        if Subset(self.cfg.subset) is Subset.HEAD or Subset(head.cfg.subset) is not Subset.HEAD:
            raise ValueError("predict_ids_with_head: call it on a LoRA posterior with a head-only one")
        model.eval()
        out = torch.empty(3, len(ids), dtype=torch.double)
        for idx, x, m in scoring_batches(ids, batch_size, model.pad_id, model.device):
            with capture_head_input(model) as phi:
                r, J = self.jacobians(model, x, m)
            v, _ = self._variance_from(J, None)
            vh, _ = head._variance_from({HEAD_KEY: phi[0].unsqueeze(1)}, None)
            out[:, idx] = torch.stack([r.double().cpu(), v.double().cpu(), vh.double().cpu()])
        return out[0], out[1], out[2]

    def pair_cache(self, model: RewardModel, pairs: Sequence[Pair], batch_size: int = 8
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """μ_Δ per pair and the τ-independent grids S of J_Δ per tensor, to evaluate any τ without backprop (§6)."""
        model.eval()
        mus: list[torch.Tensor] = []
        Ss: dict[str, list[torch.Tensor]] = {k: [] for k in self.blocks}
        for B, x, m in pair_batches(model, pairs, batch_size):
            r, J = self.jacobians(model, x, m)
            rows = torch.stack([torch.arange(B), torch.arange(B, 2 * B)])
            _, S = self._variance_from(J, rows)
            mus.append((r[:B] - r[B:]).double().cpu())
            for k in self.blocks:
                Ss[k].append(S[k].cpu())
        return torch.cat(mus), {k: torch.cat(v) for k, v in Ss.items()}

    def predict_pairs(self, model: RewardModel, pairs: Sequence[Pair], batch_size: int = 8
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_Δ, Var(Δ)) per pair, Var(Δ) = J_Δ Σ J_Δᵀ with J_Δ = J_w − J_l, so it includes −2 Cov(r_w, r_l) (§7)."""
        mu, S = self.pair_cache(model, pairs, batch_size)
        var = sum(kron_variance(S[k], self._grids[k][0], self.tau[k], self.cfg.temperature) for k in self.blocks)
        return mu, torch.as_tensor(var, dtype=torch.double)

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> None:
        """Write the posterior (safetensors + JSON) atomically to directory `path`."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"config": asdict(self.cfg), "n_data": self.n_data, "log_lik": self.log_lik,
                                "tau": self.tau, "blocks": {}, "format_version": 2,
                                "data_fingerprint": self.data_fingerprint}
        if self.fitted_pairs is not None:
            tensors["fitted_pairs"] = self.fitted_pairs.contiguous()
        for i, (k, b) in enumerate(self.blocks.items()):
            for f in _TENSORS:
                tensors[f"{i}.{f}"] = getattr(b, f).contiguous()
            meta["blocks"][k] = {"index": i, "g_rho": b.g_rho, "a_rho": b.a_rho}
        if self.head is not None and HEAD_KEY not in self.blocks:
            tensors[HEAD_KEY] = self.head.contiguous()
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / POSTERIOR_FILE))
            meta[CHECKSUMS_KEY] = tensor_checksums(tmp)
            (tmp / POSTERIOR_META).write_text(json_text(meta, Path(path) / POSTERIOR_META, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: RewardModel | None = None) -> LaplacePosterior:
        """Load, verify (checksums, finite tensors, shapes, eigenvalues ≥ 0, τ > 0) and, given `model`, check it."""
        p = Path(path)
        if not (p / POSTERIOR_META).exists():  # a run or model directory: its posterior
            p = RunDir.of(p).find_posterior() or p
        meta_file, tensor_file = p / POSTERIOR_META, p / POSTERIOR_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{p}: no Laplace posterior ({POSTERIOR_META}) here; run `bayesrm laplace` first")
        try:
            meta = json.loads(meta_file.read_bytes().decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            verify_checksums(p, meta, meta_file, required=(POSTERIOR_FILE,))
            t = load_tensors(tensor_file)
            require_finite(t, tensor_file)
            blocks = {}
            for k, info in meta["blocks"].items():
                i = info["index"]
                rho = {r: require_positive(info[r], f"block {k}: {r}", meta_file, allow_zero=True)
                       for r in ("g_rho", "a_rho")}
                blk = KronBlock(t[f"{i}.g_vals"], t[f"{i}.g_vecs"], rho["g_rho"], t[f"{i}.a_vals"],
                                t[f"{i}.a_vecs"], rho["a_rho"], t[f"{i}.theta"], t[f"{i}.mu0"])
                _check_block(k, blk, tensor_file)
                blocks[k] = blk
            cfg = LaplaceConfig(**meta["config"])
            require_positive(cfg.temperature, "config.temperature", meta_file)
            post = cls(blocks, cfg, meta["n_data"], meta["log_lik"])
            tau = meta["tau"]
            if not isinstance(tau, dict) or set(tau) != set(blocks):
                raise DataError("'tau' must give one prior precision per block", file=str(meta_file))
            post.tau = {k: require_positive(v, f"tau of {k}", meta_file) for k, v in tau.items()}
            post.head = t.get(HEAD_KEY) if HEAD_KEY not in blocks else None
            post.fitted_pairs = t.get("fitted_pairs")
            post.data_fingerprint = meta.get("data_fingerprint")
        except DataError:
            raise
        except KeyError as e:
            raise DataError(f"missing entry {e}", file=str(meta_file if e.args[0] in _META_ENTRIES else tensor_file)
                            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"malformed ({e})", file=str(meta_file)) from None
        post.source = p
        if model is not None:
            post.check_matches(model)
        return post

    def check_matches(self, model: RewardModel, atol: float = 1e-6) -> None:
        """Raise if the model's LoRA weights (and head) are not the MAP this posterior was fitted at (linear heads)."""
        where = str(self.source) if self.source is not None else None
        params = {k: p.detach() for k, p in model.named_parameters()} | {HEAD_KEY: head_theta(model)}
        for k, b in self.blocks.items():
            if k not in params:
                raise DataError(f"posterior tensor {k} not found in the model; it belongs to another model",
                                file=where)
            if tuple(params[k].shape) != tuple(b.theta.shape):
                raise DataError(f"posterior tensor {k} has shape {tuple(b.theta.shape)}, the model's "
                                f"{tuple(params[k].shape)}; refit the posterior (`bayesrm laplace`)", file=where)
            if not torch.allclose(params[k].double().cpu(), b.theta.double(), atol=atol):
                raise DataError(f"model weights differ from the posterior's MAP at {k}; refit the posterior",
                                file=where)
        if self.head is not None and (self.head.shape != params[HEAD_KEY].shape or not torch.allclose(
                params[HEAD_KEY].double().cpu(), self.head.double(), atol=atol)):
            raise DataError("model head differs from the one the posterior was fitted with; refit the posterior",
                            file=where)


_TENSORS = ("g_vals", "g_vecs", "a_vals", "a_vecs", "theta", "mu0")
_META_ENTRIES = ("blocks", "config", "n_data", "log_lik", "tau", "index", "g_rho", "a_rho")
POSTERIOR_FILE = "posterior.safetensors"


def _check_block(name: str, b: KronBlock, file: Path) -> None:
    """DataError unless the block's shapes agree (vals (k,), vecs (d, k), θ and μ0 (o, i)) and eigenvalues are ≥ 0."""
    o, i = b.shape
    ok = (b.g_vals.dim() == 1 and b.a_vals.dim() == 1 and b.g_vecs.dim() == 2 and b.a_vecs.dim() == 2
          and b.g_vecs.shape[1] == b.g_vals.numel() and b.a_vecs.shape[1] == b.a_vals.numel()
          and tuple(b.theta.shape) == (o, i) and tuple(b.mu0.shape) == (o, i))
    if not ok:
        raise DataError(f"block {name}: inconsistent tensor shapes", file=str(file))
    if bool((b.g_vals < 0).any()) or bool((b.a_vals < 0).any()):
        raise DataError(f"block {name}: negative curvature eigenvalues", file=str(file))


# --------------------------------------------------------------------------- fitting


def fit_laplace(model: RewardModel, pairs: Sequence[Pair], cfg: LaplaceConfig | None = None,
                val_pairs: Sequence[Pair] = (), progress: Callable[[int], None] | None = None,
                init_lora: dict[str, torch.Tensor] | None = None) -> LaplacePosterior:
    """Fit the Laplace posterior P = GGN/T + τI (§5) at the model's current (MAP) weights and tune τ (§6).

    `cfg.subset="lora"`: KFAC blocks over every LoRA tensor (`kfac_factors`). `"head"`: the exact GGN over the
    scalar head's weight (`head_ggn`), full d² covariance, prior mean at the head's initialisation. `init_lora`
    gives the LoRA weights at initialisation (prior mean of A under prior_mean='init'); by default the model's
    saved initial adapter is used when it has one, else 0. Under several processes (`accelerate launch`,
    `torchrun`; see `bayesrm.dist`) each accumulates the statistics of its shard of `pairs`, one all-reduce sums
    them, and rank 0 tunes τ for all: every rank returns the posterior of the whole data.
    """
    cfg = cfg or LaplaceConfig()
    require_linear_head(model)
    if not pairs:
        raise ValueError("fit_laplace needs at least one training pair")
    fit = curvature_subsample(pairs, cfg.fit_fraction)
    scale = len(pairs) / len(fit)  # the curvature and log-likelihood sums over `fit`, scaled to the n pairs
    if Subset(cfg.subset) is Subset.HEAD:  # exact GGN as the single block 1 ⊗ GGN
        ggn, log_lik = head_ggn(model, dist.shard(fit), cfg.batch_size, progress, cfg.margin, cfg.center_coef,
                                reduce=dist.all_reduce_sum)
        ggn, log_lik = ggn * scale, log_lik * scale
        av, aU, _ = factor_eig(ggn)
        theta = head_theta(model).double().cpu()  # (1, d)
        one = torch.ones(1, dtype=torch.double)
        blocks = {HEAD_KEY: KronBlock(one, torch.ones(1, 1, dtype=torch.double), 0.0, av, aU, 0.0, theta,
                                      head_prior_mean(model, cfg))}
        return _tune(_posterior(blocks, cfg, pairs, log_lik), model, val_pairs)
    G, A, log_lik = kfac_factors(model, dist.shard(fit), cfg.kfac, cfg.batch_size, progress, cfg.margin,
                                 cfg.center_coef, reduce=dist.all_reduce_sum)
    G, log_lik = {k: v * scale for k, v in G.items()}, log_lik * scale  # A is a normalised second moment
    params = dict(model.named_parameters())
    init = init_lora if init_lora is not None else getattr(model, "lora_init", None) or {}
    blocks = {}

    def eig(k: str) -> tuple[tuple[torch.Tensor, torch.Tensor, float], ...]:
        return tuple(factor_eig(F_, cfg.rank if F_.shape[0] >= cfg.lowrank_threshold else None, cfg.trace_complement)
                     for F_ in (G[k], A[k]))

    eigs = dist.spread(eig, list(G))  # each process decomposes 1/P of the blocks
    for k in G:
        (gv, gU, grho), (av, aU, arho) = eigs[k]
        theta = params[k].detach().double().cpu()
        if cfg.prior_mean == "init" and ".lora_A." in k and k in init:
            mu0 = init[k].detach().double().cpu()
        else:
            mu0 = torch.zeros_like(theta)
        blocks[k] = KronBlock(gv, gU, grho, av, aU, arho, theta, mu0)
    return _tune(_posterior(blocks, cfg, pairs, log_lik), model, val_pairs)


def curvature_subsample(pairs: Sequence[Pair], fraction: float, seed: int = 0) -> Sequence[Pair]:
    """A seeded random ⌈f·n⌉ of `pairs` (all of them when f = 1): their curvature sums times n/m estimate the
    full sums without bias, at a share f of the fit's forward+backward cost (`LaplaceConfig.fit_fraction`)."""
    if fraction >= 1.0:
        return pairs
    m = max(1, math.ceil(fraction * len(pairs)))
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=m, replace=False))
    return [pairs[i] for i in keep]


def _posterior(blocks: dict[str, KronBlock], cfg: LaplaceConfig, pairs: Sequence[Pair], log_lik: float
               ) -> LaplacePosterior:
    post = LaplacePosterior(blocks, cfg, len(pairs), log_lik)
    post.record_data(pairs)
    return post


def _tune(post: LaplacePosterior, model: RewardModel, val_pairs: Sequence[Pair]) -> LaplacePosterior:
    """Choose τ with the configured method (validation pairs only for val_nll); rank 0 tunes, every rank gets τ."""
    use_val = TauMethod(post.cfg.tau_method) is TauMethod.VAL_NLL and bool(val_pairs)
    if dist.is_main():
        post.optimize_prior_precision(val_data=post.pair_cache(model, val_pairs, post.cfg.batch_size) if use_val
                                      else None)
    post.tau = dist.broadcast(post.tau)
    post.head = head_theta(model).double().cpu()
    return post
