"""Reward-model merging: WARM averaging, task arithmetic, TIES, DARE, and layer-wise task-vector pruning (LwPTV).

Task vectors are relative to the shared pre-trained backbone θ0: for a LoRA member t, the per-module delta
τ_t,m = s_t B_t,m A_t,m (s = lora_alpha / r); for full fine-tunes, τ_t = θ_t − θ0. A *layer* is the transformer
block whose index appears in the tensor/module name as `layer.3.`, `layers.3.`, `h.3.` or `blocks.3.`; a name
without such an index is a layer of its own.

LwPTV (Zhang et al. 2025, arXiv 2506.09093; only the abstract is known, see shared/papers/lwptv.md) is a plug-in
run before any base method: a per-task, per-layer saliency s_t^l, a per-task binary mask m_t^l from it, and
τ_t^l ← m_t^l τ_t^l. The base method then runs unchanged (reading (a) of the notes: a masked task contributes
nothing at that layer but still counts in T for averaging; TIES treats its zeros like its own trimmed entries).
Where every task is masked the merged layer is exactly θ0^l. The saliency scorers here are OURS, not the paper's
formula, which is unknown: `Saliency.REL_NORM` (default) and the `Saliency.RANDOM` chance baseline; any callable
with the `SaliencyFn` signature plugs in.

A merged reward model is an ordinary `RewardModel`: one LoRA adapter on the same backbone. Linear merges (average,
task arithmetic) are represented exactly by concatenating the members' adapters (rank Σ r_t, scale 1: peft's
`add_weighted_adapter(combination_type="cat")`). Non-linear merges (TIES, DARE, magnitude pruning) act on the
dense deltas and are re-factorised by truncated SVD (peft's `*_svd` combinations); the relative Frobenius error
is logged. The scalar head is not a backbone layer: it is the normalised weighted average of the members' heads
for every method and is never pruned. Members must share the initialisation (`RMConfig.lora_seed`, WARM).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import DataError
from bayesrm.integrity import load_tensors, verify_checksums
from bayesrm.io import json_text
from bayesrm.model import (
    ADAPTER_NAME,
    CONFIG_NAME,
    HEAD_NAME,
    INIT_NAME,
    RewardModel,
    RMConfig,
    find_model_dir,
    read_config,
)

MERGE_LOG_NAME = "merge.json"
SHARED_FIELDS = ("backbone", "gguf_file", "dtype", "template", "max_length", "pooling")  # must match to merge
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)(?:\.|$)")
_PREFIX = "base_model.model."  # peft's prefix of module names in a saved adapter

Tensor = torch.Tensor
TaskVectors = list[dict[str, Tensor]]  # one {tensor or module name: τ} per task
SaliencyFn = Callable[[Sequence[Mapping[str, Tensor]], Mapping[str, Tensor] | None, Mapping[str, list[str]]], Tensor]


class MergeMethod(str, Enum):
    """How the task vectors are combined into one Δ (θ = θ0 + Δ)."""

    AVERAGE = "average"  # WARM (Ramé et al. 2024): Δ = Σ w_t τ_t, weights normalised to sum 1
    TASK_ARITHMETIC = "task_arithmetic"  # Ilharco et al. 2023: Δ = λ Σ w_t τ_t
    TIES = "ties"  # Yadav et al. 2023: trim to top-k, elect sign, disjoint mean; Δ = λ τ_m
    DARE_LINEAR = "dare_linear"  # Yu et al. 2024: drop with prob p, rescale 1/(1−p), then task arithmetic
    DARE_TIES = "dare_ties"  # DARE drop-and-rescale, then TIES sign election and disjoint mean
    MAGNITUDE_PRUNE = "magnitude_prune"  # top-k trim, then task arithmetic


LINEAR_METHODS = (MergeMethod.AVERAGE, MergeMethod.TASK_ARITHMETIC)


class Saliency(str, Enum):
    """Per-task, per-layer saliency for LwPTV masks (low saliency = redundant = pruned). Both are OURS."""

    REL_NORM = "rel_norm"  # ‖τ_t^l‖_F / ‖θ0^l‖_F: how far task t moved layer l (see `rel_norm_saliency`)
    RANDOM = "random"  # i.i.d. uniform scores: random layer masks of the same sparsity (the chance baseline)


@dataclass
class MergeConfig:
    """Settings of one merge (base method + optional LwPTV pruning)."""

    method: str = MergeMethod.AVERAGE.value  # average | task_arithmetic | ties | dare_linear | dare_ties | …
    weights: list[float] | None = None  # per-model w_t; None: uniform (1/T for average, 1 otherwise)
    lam: float = 1.0  # λ scaling of the merged task vector (ignored by average)
    density: float = 0.2  # TIES / magnitude_prune: fraction k of entries kept per tensor by magnitude
    drop_rate: float = 0.5  # DARE: drop probability p (kept entries rescaled by 1/(1−p))
    seed: int = 0  # DARE dropout masks and random LwPTV scores
    majority_sign: str = "total"  # TIES sign election: total (sum of values) | frequency (count of signs)
    lwptv: bool = False  # prune task vectors layer by layer before merging
    saliency: str | SaliencyFn = Saliency.REL_NORM.value  # rel_norm | random | a callable (tau, base, layers) → (T, L)
    prune_ratio: float = 1 / 3  # LwPTV: fraction of layers pruned per task (lowest saliency first)
    rank: int | None = None  # LoRA rank of the merged adapter; None: Σ r_t (exact for linear methods)

    def __post_init__(self) -> None:
        for enum, value in ((MergeMethod, self.method), (Saliency, self.saliency)):
            if isinstance(value, str) and value not in {e.value for e in enum}:
                raise ValueError(f"unknown {enum.__name__} {value!r}; choose from {[e.value for e in enum]}")
        for name, lo, hi in (("density", 0.0, 1.0), ("drop_rate", 0.0, 0.999999), ("prune_ratio", 0.0, 1.0)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {getattr(self, name)}")
        if self.majority_sign not in ("total", "frequency"):
            raise ValueError(f"majority_sign must be 'total' or 'frequency', got {self.majority_sign!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")


@dataclass
class LoraAdapter:
    """One member's LoRA weights by module name: ΔW_m = scale · B_m A_m with A (r, i), B (o, r)."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]
    scale: float

    @property
    def rank(self) -> int:
        return int(next(iter(self.a.values())).shape[0])


@dataclass
class MergeResult:
    """The merged adapter (rank `rank`, scale 1) and what the merge did."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]
    rank: int
    log: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- task vectors and layers


def layer_of(name: str) -> str:
    """Layer key of a tensor or module name: the transformer block index, else the name itself."""
    m = _LAYER_RE.search(name)
    return m.group(1) if m else name


def group_layers(names: Sequence[str]) -> dict[str, list[str]]:
    """Layer key → names in it; numbered blocks first in index order, then unnumbered names."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_of(n), []).append(n)
    return dict(sorted(groups.items(), key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0])))


def lora_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """Dense LoRA update ΔW = s · B A (Hu et al. 2022, Eq. 3), (o, i)."""
    return scale * (b @ a)


def lora_task_vectors(adapters: Sequence[LoraAdapter]) -> TaskVectors:
    """Per-module task vectors τ_t,m = s_t B_t,m A_t,m of LoRA members (all relative to the same θ0)."""
    return [{m: lora_delta(ad.a[m], ad.b[m], ad.scale) for m in ad.a} for ad in adapters]


def full_task_vectors(finetuned: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor]) -> TaskVectors:
    """Task vectors τ_t = θ_t − θ0 of fully fine-tuned weights (Ilharco et al. 2023, Eq. 1)."""
    return [{k: t[k] - base[k] for k in base} for t in finetuned]


def _check_same_keys(tau: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if not tau:
        raise ValueError("nothing to merge: no task vectors")
    keys = list(tau[0])
    for i, t in enumerate(tau[1:], 1):
        if set(t) != set(keys):
            diff = sorted(set(t) ^ set(keys))[:3]
            raise ValueError(f"model {i} has other tensors than model 0 (e.g. {diff}); merge needs the same targets")
    return keys


# --------------------------------------------------------------------------- LwPTV: saliency and masks


def rel_norm_saliency(tau: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None,
                      layers: Mapping[str, list[str]]) -> Tensor:
    """OURS: s_t^l = ‖τ_t^l‖_F / ‖θ0^l‖_F, the relative update of layer l by task t, (T, L).

    Reasoning (the paper's formula is unknown): a layer that task t barely moved relative to its pre-trained
    weights carries little of that task's signal, so its task vector is redundant for t. With Adam, parameters
    whose gradient keeps its sign move ~lr per step while noisy ones random-walk, so a small relative norm marks
    a layer whose update is mostly noise; in a merge those small noisy deltas of T tasks add up as interference
    and pull the layer away from θ0, whose general features serve OOD inputs. Pruning them keeps θ0^l at little
    in-domain cost. Per-task ranking is invariant to the task's overall scale. Without `base`, ‖τ_t^l‖_F.
    """
    out = torch.zeros(len(tau), len(layers), dtype=torch.float64)
    for j, names in enumerate(layers.values()):
        ref = 1.0 if base is None else float(sum(base[n].double().square().sum() for n in names)) ** 0.5
        for t, tv in enumerate(tau):
            out[t, j] = float(sum(tv[n].double().square().sum() for n in names)) ** 0.5 / max(ref, 1e-30)
    return out


def random_saliency(n_tasks: int, n_layers: int, seed: int) -> Tensor:
    """Chance baseline: i.i.d. U(0, 1) scores, so `layer_masks` prunes a uniformly random layer subset per task."""
    return torch.rand(n_tasks, n_layers, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer_saliency(kind: Saliency | str | SaliencyFn, tau: Sequence[Mapping[str, Tensor]],
                   base: Mapping[str, Tensor] | None, layers: Mapping[str, list[str]], seed: int = 0) -> Tensor:
    """Saliency scores (T, L) from a `Saliency` name or a callable (tau, base, layers) → (T, L)."""
    if callable(kind) and not isinstance(kind, str):
        scores = torch.as_tensor(kind(tau, base, layers), dtype=torch.float64)
    elif Saliency(kind) is Saliency.RANDOM:
        scores = random_saliency(len(tau), len(layers), seed)
    else:
        scores = rel_norm_saliency(tau, base, layers)
    if scores.shape != (len(tau), len(layers)):
        raise ValueError(f"saliency must have shape (tasks, layers) = {(len(tau), len(layers))}, got "
                         f"{tuple(scores.shape)}")
    return scores


def layer_masks(scores: Tensor, prune_ratio: float) -> Tensor:
    """Per-task masks m_t ∈ {0,1}^L (T, L): prune round(ratio·L) lowest-saliency layers of each task (ours)."""
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
    n_tasks, n_layers = scores.shape
    k = round(prune_ratio * n_layers)
    masks = torch.ones(n_tasks, n_layers, dtype=torch.bool)
    order = torch.argsort(scores, dim=1, stable=True)  # (T, L) ascending saliency
    for t in range(n_tasks):
        masks[t, order[t, :k]] = False
    return masks


def apply_layer_masks(tau: Sequence[Mapping[str, Tensor]], masks: Tensor, layers: Mapping[str, list[str]]
                      ) -> TaskVectors:
    """τ̃_t^l = m_t^l τ_t^l: masked (task, layer) entries become exact zeros (LwPTV step 3)."""
    if masks.shape != (len(tau), len(layers)):
        raise ValueError(f"masks must have shape (tasks, layers) = {(len(tau), len(layers))}, got "
                         f"{tuple(masks.shape)}")
    keep = {n: j for j, names in enumerate(layers.values()) for n in names}
    return [{n: v if bool(masks[t, keep[n]]) else torch.zeros_like(v) for n, v in tv.items()}
            for t, tv in enumerate(tau)]


# --------------------------------------------------------------------------- base methods (dense)


def method_weights(method: MergeMethod | str, weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-task w_t: given, or uniform; normalised to sum 1 for averaging (WARM, Ramé et al. 2024, Eq. 2)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} models")
    if MergeMethod(method) is MergeMethod.AVERAGE:
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"average needs non-negative weights with a positive sum, got {w}")
        w = [x / sum(w) for x in w]
    return w


def merge_tensors(tensors: Sequence[Tensor], weights: Sequence[float], cfg: MergeConfig, seed: int = 0) -> Tensor:
    """One tensor's merged Δ by task arithmetic / TIES / DARE (Ilharco 2023; Yadav 2023; Yu 2024), via peft.

    Uses `peft.utils.merge_utils`: `prune` (magnitude top-k or DARE drop-and-rescale), `calculate_majority_sign_mask`,
    `disjoint_merge`, `task_arithmetic`; like peft's `ties`, signs are elected on the unweighted trimmed tensors
    and w_t is applied before the disjoint mean. `weights` are used as given (see `method_weights`); λ multiplies
    the result for every method but average. DARE draws its masks from `seed`.
    """
    from peft.utils import merge_utils as mu

    method = MergeMethod(cfg.method)
    w = torch.tensor(list(weights), dtype=tensors[0].dtype)
    ts = list(tensors)
    if method in (MergeMethod.TIES, MergeMethod.MAGNITUDE_PRUNE) and cfg.density < 1:
        ts = [mu.prune(t, cfg.density, "magnitude") for t in ts]
    if method in (MergeMethod.DARE_LINEAR, MergeMethod.DARE_TIES) and cfg.drop_rate > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ts = [mu.prune(t, 1.0 - cfg.drop_rate, "random", rescale=True) for t in ts]
    if method in (MergeMethod.TIES, MergeMethod.DARE_TIES):
        stacked = torch.stack(ts)  # (T, *shape)
        sign = mu.calculate_majority_sign_mask(stacked, method=cfg.majority_sign)  # type: ignore[arg-type]
        merged = mu.disjoint_merge(stacked * mu.reshape_weight_task_tensors(stacked, w), sign)
    else:
        merged = mu.task_arithmetic(ts, w)
    return merged if method is MergeMethod.AVERAGE else cfg.lam * merged


def merge_task_vectors(tau: Sequence[Mapping[str, Tensor]], cfg: MergeConfig, masks: Tensor | None = None,
                       layers: Mapping[str, list[str]] | None = None) -> dict[str, Tensor]:
    """Merged Δ per tensor from task vectors, after LwPTV masks (T, L) when given (shared/papers/lwptv.md, step 4).

    Each tensor's DARE masks are seeded by (cfg.seed, tensor index), so masking never changes the other draws.
    """
    keys = _check_same_keys(tau)
    w = method_weights(cfg.method, cfg.weights, len(tau))
    if masks is not None:
        tau = apply_layer_masks(tau, masks, layers or group_layers(keys))
    return {k: merge_tensors([t[k] for t in tau], w, cfg, seed=cfg.seed * 1_000_003 + i) for i, k in enumerate(keys)}


def merge_heads(heads: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Scalar head as the normalised weighted average Σ w_t h_t / Σ w_t (not a backbone layer: never pruned)."""
    tot = sum(weights)
    if tot <= 0:
        raise ValueError(f"the head is averaged with the merge weights; they must have a positive sum, got {weights}")
    w = torch.tensor([x / tot for x in weights], dtype=torch.float64)  # (T,)
    return {k: torch.einsum("t,t...->...", w, torch.stack([h[k].double() for h in heads])).to(heads[0][k].dtype)
            for k in heads[0]}


# --------------------------------------------------------------------------- LoRA representation


def concat_adapters(adapters: Sequence[LoraAdapter], coefs: Sequence[float],
                    keep: Mapping[str, Sequence[bool]] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Exact LoRA form of Σ_t c_t s_t B_t A_t: B = [B_1 … B_T], A = [c_1 s_1 A_1; …; c_T s_T A_T] (peft `cat`).

    `keep[m][t]` False zeroes task t's block in module m, so it contributes an exact 0.
    """
    a_out, b_out = {}, {}
    for m in adapters[0].a:
        blocks_a, blocks_b = [], []
        for t, (ad, c) in enumerate(zip(adapters, coefs, strict=True)):
            on = keep is None or keep[m][t]
            blocks_a.append(c * ad.scale * ad.a[m] if on else torch.zeros_like(ad.a[m]))  # (r_t, i)
            blocks_b.append(ad.b[m] if on else torch.zeros_like(ad.b[m]))  # (o, r_t)
        a_out[m], b_out[m] = torch.cat(blocks_a, 0), torch.cat(blocks_b, 1)  # (Σr, i), (o, Σr)
    return a_out, b_out


def svd_factorise(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-k factors Δ ≈ B A (Eckart–Young), balanced B = U√S, A = √S Vᵀ; returns (A, B, relative error)."""
    o, i = delta.shape
    a, b = torch.zeros(rank, i, dtype=delta.dtype), torch.zeros(o, rank, dtype=delta.dtype)
    norm = float(delta.double().norm())
    if norm == 0.0:
        return a, b, 0.0
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    b[:, :k] = (U[:, :k] * root).to(delta.dtype)  # (o, k)
    a[:k] = (root[:, None] * Vh[:k]).to(delta.dtype)  # (k, i)
    err = float((delta.double() - b.double() @ a.double()).norm()) / norm
    return a, b, err


def merge_adapters(adapters: Sequence[LoraAdapter], cfg: MergeConfig, base: Mapping[str, Tensor] | None = None,
                   masks: Tensor | None = None) -> MergeResult:
    """Merge LoRA members into one adapter of scale 1 (θ0 + B A), with LwPTV when `cfg.lwptv` or `masks` is given.

    `base` holds θ0 per module (for the rel_norm saliency). Linear methods with `cfg.rank=None` concatenate the
    adapters (exact); otherwise the dense merged Δ_m is re-factorised by truncated SVD to `cfg.rank` (default Σ r_t).
    """
    keys = _check_same_keys([ad.a for ad in adapters])
    method = MergeMethod(cfg.method)
    layers = group_layers(keys)
    w = method_weights(method, cfg.weights, len(adapters))
    tau = lora_task_vectors(adapters)
    kind = cfg.saliency if isinstance(cfg.saliency, str) else getattr(cfg.saliency, "__name__", "custom")
    log: dict[str, Any] = {"method": method.value, "weights": w, "lam": 1.0 if method is MergeMethod.AVERAGE
                           else cfg.lam, "config": asdict(cfg) | {"saliency": kind}, "layers": list(layers),
                           "n_models": len(adapters)}
    if masks is None and cfg.lwptv:
        scores = layer_saliency(cfg.saliency, tau, base, layers, cfg.seed)
        masks = layer_masks(scores, cfg.prune_ratio)
        log["saliency"] = {"kind": kind, "scores": scores.tolist(), "ours": True}
    if masks is not None:
        log["masks"] = masks.int().tolist()
        log["pruned_fraction"] = float(1 - masks.double().mean())
    rank = cfg.rank or sum(ad.rank for ad in adapters)
    if method in LINEAR_METHODS and cfg.rank is None:
        coefs = w if method is MergeMethod.AVERAGE else [cfg.lam * x for x in w]
        col = {n: j for j, names in enumerate(layers.values()) for n in names}
        keep = None if masks is None else {m: [bool(masks[t, col[m]]) for t in range(len(adapters))] for m in keys}
        a, b = concat_adapters(adapters, coefs, keep)
        log["svd_rel_error"] = dict.fromkeys(keys, 0.0)
        log["representation"] = "cat (exact)"
        return MergeResult(a, b, rank, log)
    delta = merge_task_vectors(tau, cfg, masks, layers)
    a, b, errs = {}, {}, {}
    for m in keys:
        a[m], b[m], errs[m] = svd_factorise(delta[m], rank)
    log["svd_rel_error"] = errs
    log["representation"] = f"svd rank {rank}"
    return MergeResult(a, b, rank, log)


# --------------------------------------------------------------------------- reward models on disk


@dataclass
class Member:
    """A saved reward model as the merge reads it (no backbone loaded)."""

    path: Path
    config: RMConfig
    adapter: LoraAdapter
    head: dict[str, Tensor]
    lora_init: dict[str, Tensor]


def read_member(path: str | Path) -> Member:
    """Config, LoRA adapter (by module name), head and initial A of a saved `RewardModel`."""
    p = find_model_dir(path)
    cfg, meta = read_config(p)
    verify_checksums(p, meta, p / CONFIG_NAME, required=(ADAPTER_NAME, HEAD_NAME))
    try:
        peft_cfg = json.loads((p / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable ({e})", file=str(p / "adapter_config.json")) from None
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern") or peft_cfg.get("use_dora"):
        raise ValueError(f"{p}: rank/alpha patterns and DoRA are not supported by merge")
    r, alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    scale = alpha / r ** 0.5 if peft_cfg.get("use_rslora") else alpha / r
    a, b = {}, {}
    for k, v in load_tensors(p / ADAPTER_NAME).items():
        mod = k.removeprefix(_PREFIX)
        if mod.endswith(".lora_A.weight"):
            a[mod.removesuffix(".lora_A.weight")] = v
        elif mod.endswith(".lora_B.weight"):
            b[mod.removesuffix(".lora_B.weight")] = v
        else:
            raise ValueError(f"{p}: unexpected adapter tensor {k}")
    init = load_tensors(p / INIT_NAME) if (p / INIT_NAME).exists() else {}
    return Member(p, cfg, LoraAdapter(a, b, scale), load_tensors(p / HEAD_NAME), init)


def check_members(members: Sequence[Member]) -> None:
    """Refuse members that do not share a backbone and LoRA targets; warn when their initialisations differ."""
    first = members[0].config
    for m in members:
        if getattr(m.config, "head", "linear") != "linear" or set(m.head) != {"weight", "bias"}:
            raise ValueError(f"{m.path}: merge supports the linear BT head only")
    for m in members[1:]:
        for f in (*SHARED_FIELDS, "target_modules"):
            if getattr(m.config, f) != getattr(first, f):
                raise ValueError(f"cannot merge {members[0].path} and {m.path}: they differ in '{f}' "
                                 f"({getattr(first, f)!r} vs {getattr(m.config, f)!r}); merging needs one backbone")
    inits = [m.lora_init for m in members]
    comparable = all(inits) and all(set(i) == set(inits[0]) and all(i[k].shape == inits[0][k].shape for k in i)
                                    for i in inits)
    same = (all(torch.equal(i[k], inits[0][k]) for i in inits for k in i) if comparable  # same rank: compare A0
            else len({m.config.lora_seed for m in members}) == 1)  # other ranks: the seed is all we can compare
    if not same:
        warnings.warn("merged models have different LoRA/head initialisations (lora_seed "
                      f"{[m.config.lora_seed for m in members]}); weight averaging assumes a shared init (WARM)",
                      UserWarning, stacklevel=2)


def merge_models(paths: Sequence[str | Path], cfg: MergeConfig | None = None) -> tuple[RewardModel, dict[str, Any]]:
    """Merge saved reward models into a new `RewardModel` (one adapter, scale 1) and return it with the merge log.

    The Laplace prior mean of the merged adapter (`lora_init`) is A at its merged value and B at 0, i.e. ΔW = 0
    (θ0), as for a freshly initialised member.
    """
    from peft import set_peft_model_state_dict

    cfg = cfg or MergeConfig()
    if not paths:
        raise ValueError("merge needs at least one model")
    members = [read_member(p) for p in paths]
    check_members(members)
    adapters = [m.adapter for m in members]
    rank = cfg.rank or sum(ad.rank for ad in adapters)
    mc = replace(members[0].config, lora_r=rank, lora_alpha=rank, lora_dropout=0.0,
                 extra={"merge": {"method": MergeMethod(cfg.method).value, "lwptv": cfg.lwptv,
                                  "members": [str(m.path) for m in members]}})
    model = RewardModel(mc)
    params = dict(model.named_parameters())
    base = {m: params[f"backbone.{_PREFIX}{m}.base_layer.weight"].detach() for m in adapters[0].a}
    res = merge_adapters(adapters, cfg, base)
    dtype = next(iter(base.values())).dtype
    state = {f"{_PREFIX}{m}.lora_A.weight": res.a[m].to(dtype) for m in res.a} | {
        f"{_PREFIX}{m}.lora_B.weight": res.b[m].to(dtype) for m in res.b}
    unexpected = list(getattr(set_peft_model_state_dict(model.backbone, state), "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"merged adapter does not fit the backbone: {unexpected[:3]}")
    w = method_weights(cfg.method, cfg.weights, len(members))
    model.head.load_state_dict(merge_heads([m.head for m in members], w))
    model.lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    model.eval()
    res.log["members"] = [str(m.path) for m in members]
    res.log["head"] = "normalised weighted average of the members' heads (not pruned)"
    return model, res.log


def save_merged(model: RewardModel, log: Mapping[str, Any], out: str | Path) -> None:
    """Save the merged model (an ordinary RewardModel directory) with the merge log as `merge.json` inside."""

    def write(p: Path) -> None:
        p.write_text(json_text(log, Path(out) / MERGE_LOG_NAME, indent=2) + "\n")

    model.save(out, extra_files={MERGE_LOG_NAME: write})
