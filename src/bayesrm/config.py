"""Typed configs (model, training, Laplace fit, fast heads, active labelling), str-Enum choices validated on creation.

This module imports nothing heavy: the CLI reads its defaults from these dataclasses before torch loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from bayesrm.templates import ResponseKeep, Template

EMBEDDED_BACKBONE = "all-MiniLM-L6-v2"


def _choice(enum: type[Enum], value: Any, name: str) -> Any:
    """`value` as a member's value of `enum`, or ValueError naming the field and the allowed choices."""
    try:
        return enum(value).value
    except ValueError:
        raise ValueError(f"{name} must be one of {[e.value for e in enum]}, got {value!r}") from None


class MixedPrecision(str, Enum):
    """Autocast dtype of training."""

    NO = "no"  # fp32
    BF16 = "bf16"  # bf16 autocast (falls back to fp32 where bf16 matmuls are not native)


@dataclass
class TrainConfig:
    """Optimisation settings (paper App. C.2: batch 8, linear schedule, weight decay 0)."""

    epochs: int = 1  # passes over the training pairs
    lr: float = 2e-4  # AdamW learning rate (peak)
    batch_size: int = 8  # pairs per micro-batch and process (global batch: batch_size × processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.03  # fraction of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    margin: float = 0.0  # BT margin m in −log σ(r_w − r_l − m)
    center_coef: float = 0.0  # weight of the reward-centering term (r_w + r_l)²
    data_seed: int = 0  # data order and dropout RNG (LoRA init is RMConfig.lora_seed)
    group_by_length: bool = True  # batches of similar length, in random order
    mixed_precision: str = "no"  # no | bf16 (autocast; falls back to fp32 where bf16 matmuls are not native)
    eval_batch_size: int = 32  # responses per scoring batch
    checkpoint_every: int = 100  # optimizer steps between atomic checkpoints (0: only at epoch ends)
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)

    def __post_init__(self) -> None:
        self.mixed_precision = _choice(MixedPrecision, self.mixed_precision, "mixed_precision")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.checkpoint_every < 0 or self.center_coef < 0:
            raise ValueError("checkpoint_every and center_coef must be ≥ 0")


class KFACVariant(str, Enum):
    """How per-token curvature is collapsed into Kronecker factors (Eschenhagen et al. 2023)."""

    PAIR = "pair"  # factorise each pair's exact J_Δ: G = Σ Λ J_Δ J_Δᵀ, A = Σ Λ J_Δᵀ J_Δ / Σ Λ‖J_Δ‖² (default)
    REDUCE = "reduce"  # one row per response: ĝ = Σ_t g_t, ā = mean_t a_t
    EXPAND = "expand"  # one row per token: G = Σ g gᵀ, A = mean over real tokens of a aᵀ


class PriorStructure(str, Enum):
    """Prior precision τ shared by all tensors or one per tensor."""

    GLOBAL = "global"
    LAYERWISE = "layerwise"


class Subset(str, Enum):
    """Which parameters the posterior covers."""

    LORA = "lora"  # every LoRA A/B tensor, KFAC blocks (Laplace-LoRA)
    HEAD = "head"  # the scalar head's [weight, bias] only, exact GGN, full covariance (last-layer Laplace)


class TauMethod(str, Enum):
    """How the prior precision is chosen."""

    MARGLIK = "marglik"  # maximise the Laplace log marginal likelihood (exact 1-D optimisation per τ)
    MACKAY = "mackay"  # MacKay's fixed point τ = γ / ‖θ* − μ0‖²
    VAL_NLL = "val_nll"  # grid over log τ minimising validation NLL of the probit predictive
    FIXED = "fixed"  # keep the given value


@dataclass
class LaplaceConfig:
    """Settings of the post-hoc Laplace fit."""

    subset: str = Subset.LORA.value  # lora (KFAC over LoRA tensors) | head (exact GGN over the head, baseline)
    kfac: str = KFACVariant.PAIR.value  # pair | reduce | expand (pair keeps the w/l cross term; see kfac_factors)
    rank: int | None = None  # keep this many eigenpairs of factors larger than `lowrank_threshold`
    lowrank_threshold: int = 2048  # factor side from which `rank` applies (hidden ≥ 2048)
    trace_complement: bool = True  # give dropped directions the mean dropped eigenvalue instead of 0
    prior_structure: str = PriorStructure.LAYERWISE.value  # global | layerwise
    tau_method: str = TauMethod.MARGLIK.value  # marglik | mackay | val_nll | fixed
    prior_precision: float = 1.0  # initial / fixed τ
    prior_mean: str = "init"  # "init": A (and a head-only fit's w) at initialisation, B at 0 (§5); "zero"
    temperature: float = 1.0  # T in P = GGN/T + τ
    batch_size: int = 8  # pairs per fit batch
    margin: float = 0.0  # BT margin m of the training loss: p = σ(Δ − m)
    center_coef: float = 0.0  # reward-centering weight c of the training loss: adds 2c·J_s J_sᵀ to the GGN
    fit_fraction: float = 1.0  # accumulate the curvature on this seeded share of the pairs, scaled by n/m (cost ∝)

    def __post_init__(self) -> None:
        self.subset, self.kfac = _choice(Subset, self.subset, "subset"), _choice(KFACVariant, self.kfac, "kfac")
        self.prior_structure = _choice(PriorStructure, self.prior_structure, "prior_structure")
        self.tau_method = _choice(TauMethod, self.tau_method, "tau_method")
        if self.prior_mean not in ("init", "zero"):
            raise ValueError(f"prior_mean must be 'init' or 'zero', got {self.prior_mean!r}")
        if self.center_coef < 0 or self.temperature <= 0 or self.prior_precision <= 0:
            raise ValueError("center_coef must be ≥ 0, temperature and prior_precision > 0")
        if not 0.0 < self.fit_fraction <= 1.0:
            raise ValueError(f"fit_fraction must be in (0, 1], got {self.fit_fraction}")
        if self.center_coef and KFACVariant(self.kfac) is not KFACVariant.PAIR and Subset(self.subset) is Subset.LORA:
            raise ValueError("the centering curvature is implemented for kfac='pair' and subset='head'; "
                             f"kfac={self.kfac!r} would drop it")

    def for_training(self, train: dict[str, Any]) -> LaplaceConfig:
        """This config with the likelihood of a run's TrainConfig fields (margin, center_coef)."""
        return replace(self, margin=float(train.get("margin", 0.0)), center_coef=float(train.get("center_coef", 0.0)))


class Head(str, Enum):
    """What turns the reward-token features into a reward (`heads.build_head`)."""

    LINEAR = "linear"  # nn.Linear(d, 1): the BT scalar head
    BNRM = "bnrm"  # Bayesian non-negative factor head (bayesrm.bnrm), with predictive moments


class Pooling(str, Enum):
    """Which hidden state the scalar head reads."""

    AUTO = "auto"  # LAST for decoders, FIRST for encoders
    LAST = "last"  # last non-pad token (decoders)
    FIRST = "first"  # first token, e.g. [CLS] (encoders)
    MEAN = "mean"  # mean over non-pad tokens


_LEGACY_TRUNCATION: dict[str, Any] = {"prompt_budget": 0.0, "response_keep": "end"}  # saved before these fields
_NEW_FIELDS = {"head": Head.LINEAR.value, "bnrm": None, "freeze_backbone": False,
               "seq_cls": False}  # added after format_version 1


@dataclass
class RMConfig:
    """Everything needed to rebuild a reward model and format its inputs."""

    backbone: str = EMBEDDED_BACKBONE  # hub id, local path, or the embedded all-MiniLM-L6-v2
    template: str = Template.OASST.value  # prompt template (oasst | chat | plain)
    max_length: int = 500  # tokens, including the prompt and special tokens
    prompt_budget: float = 0.25  # share of max_length kept for the end of the prompt when a pair is too long
    response_keep: str = ResponseKeep.AUTO.value  # auto | end | start: which end of a long response survives
    pooling: str = Pooling.AUTO.value  # where the reward is read
    lora_r: int = 8  # paper: r=8
    lora_alpha: int = 16  # paper: α=16
    lora_dropout: float = 0.0  # paper: 0
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    lora_seed: int = 0  # seeds LoRA A init and the head init
    gguf_file: str | None = None  # load a GGUF checkpoint inside `backbone` (a folder or hub repo)
    dtype: str = "float32"  # backbone weights dtype (float32 | bfloat16 | float16)
    disable_dropout: bool = True  # zero the backbone's dropout (as TRL's RewardConfig does); LoRA dropout is separate
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (data, seeds, …)
    head: str = Head.LINEAR.value  # linear | bnrm
    bnrm: dict[str, Any] | None = None  # BNRMConfig fields for head="bnrm" (None: its defaults)
    freeze_backbone: bool = False  # train the head only: the LoRA adapter stays at its no-op init (B = 0)
    seq_cls: bool = False  # `backbone` is a transformers *ForSequenceClassification reward model used as is: no
    #                        LoRA; its final one-output linear layer is the head (scoring, head-only Laplace)

    def to_dict(self) -> dict[str, Any]:
        """Fields as saved; fields added later are written only when set, so older models keep their bytes."""
        return {k: v for k, v in asdict(self).items() if k not in _NEW_FIELDS or v != _NEW_FIELDS[k]}

    def __post_init__(self) -> None:
        if self.head == Head.BNRM.value:  # saved in full, so a loaded model rebuilds the same head
            from bayesrm.bnrm import BNRMConfig

            self.bnrm = asdict(BNRMConfig.from_dict(self.bnrm or {}))
        if not 0.0 <= self.prompt_budget < 1.0:
            raise ValueError(f"prompt_budget must be in [0, 1), got {self.prompt_budget}")
        for name, enum in (("response_keep", ResponseKeep), ("pooling", Pooling), ("head", Head),
                           ("template", Template)):
            setattr(self, name, _choice(enum, getattr(self, name), name))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"format_version", "checksums"}  # metadata saved beside the fields
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = _LEGACY_TRUNCATION | d  # saved before prompt-aware truncation: keep scoring them as they were trained
        return cls(**{k: v for k, v in d.items() if k in known})


class HeadKind(str, Enum):
    """Architecture of each head."""

    LINEAR = "linear"  # r = wᵀf
    MLP = "mlp"  # r = w₂ᵀ relu(W₁ᵀf + b₁)


class LaplaceParams(str, Enum):
    """Which head parameters the head-only Laplace posterior covers."""

    LAST = "last"  # the last linear layer (all of a linear head): r is linear in it, so the GGN is the Hessian
    ALL = "all"  # every head parameter (small MLPs: the dense GGN is P × P)


@dataclass
class HeadConfig:
    """Heads on frozen features; training is full-data Adam epochs over shuffled mini-batches."""

    kind: str = HeadKind.LINEAR.value  # linear | mlp
    hidden: int = 64  # MLP width
    members: int = 1  # ensemble size M (trained together, vectorised)
    epochs: int = 50  # passes over the training pairs
    lr: float = 3e-3  # Adam learning rate
    batch_size: int = 64  # pairs per step
    l2: float = 1e-3  # Gaussian prior on the head weights: loss = mean BT + (l2/2)·‖θ‖² (MAP)
    seed: int = 0  # member i uses seed + i for its initialisation and data order

    def __post_init__(self) -> None:
        self.kind = _choice(HeadKind, self.kind, "kind")
        for name in ("hidden", "members", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.l2 < 0:
            raise ValueError(f"HeadConfig needs lr > 0 and l2 ≥ 0, got lr={self.lr}, l2={self.l2}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown head config fields: {sorted(set(d) - known)}")
        return cls(**d)


class SelectBy(str, Enum):
    """How unlabelled pairs are ranked for labelling."""

    BALD = "bald"  # mutual information between the label and the parameters (expected information gain)
    SIGMA = "sigma"  # σ_Δ = √Var Δ, the posterior std of the reward difference
    RANDOM = "random"  # a seeded random order (the baseline)


@dataclass
class EvalConfig:
    """Settings of `bayesrm eval`."""

    levels: tuple[float, ...] = (0.5, 0.9, 0.95)  # nominal levels of the central predictive intervals
    n_bins: int = 10  # equal-width confidence bins on [0.5, 1] for ECE, MCE and the reliability diagram
    n_boot: int = 1000  # bootstrap replicates (resampling prompts) for the confidence intervals
    ci_level: float = 0.95  # level of those intervals
    seed: int = 0  # bootstrap seed
    batch_size: int = 16  # forward batch size

    def __post_init__(self) -> None:
        self.levels = tuple(float(x) for x in self.levels)
        if not self.levels or any(not 0 < x < 1 for x in self.levels):
            raise ValueError(f"coverage levels must lie in (0, 1), got {list(self.levels)}")
        if self.n_bins < 1 or self.n_boot < 1 or not 0 < self.ci_level < 1:
            raise ValueError("need n_bins ≥ 1, n_boot ≥ 1 and 0 < ci_level < 1")
