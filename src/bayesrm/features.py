"""Reward-token features of a frozen backbone, computed once and cached on disk (the fast path's input).

With the backbone frozen, r = head(f(x, y)) and f never changes, so the expensive part of training, scoring and
Laplace is one pass of the backbone over the data. `pair_features` runs that pass once per (backbone weights,
tokenisation settings, data) and keeps the result in `cache_dir/<fingerprint>.safetensors` (written atomically);
any change to what the features depend on changes the fingerprint, so a stale file is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import DataError, Pair, pairs_fingerprint
from bayesrm.integrity import load_tensors, require_finite
from bayesrm.io import atomic_path
from bayesrm.model import RewardModel

FORMAT_VERSION = 1


@dataclass
class PairFeatures:
    """Features of each pair's chosen and rejected response, (N, d) each, in the order of the pairs."""

    chosen: torch.Tensor  # (N, d)
    rejected: torch.Tensor  # (N, d)
    fingerprint: str  # the cache key they were computed (or loaded) under

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> PairFeatures:
        """The features of pairs `idx` (same fingerprint: a view of the same cache entry)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return PairFeatures(self.chosen[i], self.rejected[i], self.fingerprint)


def weights_fingerprint(model: RewardModel) -> str:
    """SHA-256 of the backbone weights the features depend on.

    LoRA tensors count only when some `lora_B` is non-zero: at B = 0 the adapter is a no-op, so models that differ
    only in their LoRA initialisation (`lora_seed`) share features.
    """
    named = dict(model.backbone.named_parameters())
    live_lora = any(".lora_B." in n and bool(p.detach().ne(0).any()) for n, p in named.items())
    h = hashlib.sha256()
    for n in sorted(named):
        if "lora_" in n and not live_lora:
            continue
        t = named[n].detach().cpu().contiguous()
        h.update(f"{n}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_key(model: RewardModel, pairs: Sequence[Pair]) -> dict[str, Any]:
    """Everything the cached features depend on: model name and weights, template, tokenisation, pooling, data."""
    cfg = model.config
    tok = model.tokenizer
    return {
        "format_version": FORMAT_VERSION,
        "backbone": cfg.backbone,
        "gguf_file": cfg.gguf_file,
        "dtype": cfg.dtype,
        "weights_sha256": weights_fingerprint(model),
        "tokenizer": [type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok)],
        "template": cfg.template,
        "max_length": cfg.max_length,
        "truncation": {"prompt_budget": cfg.prompt_budget, "response_keep": cfg.response_keep},  # with pooling
        "pooling": model.pooling.value,
        "n_pairs": len(pairs),
        "data_sha256": pairs_fingerprint(pairs),
    }


def fingerprint(key: dict[str, Any]) -> str:
    """Short hash of a feature key (the cache file's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _compute(model: RewardModel, pairs: Sequence[Pair], batch_size: int,
             progress: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone pass over all chosen and rejected responses (RewardModel's batched, length-sorted loop)."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    f = model.per_response(prompts, responses, lambda x: x, batch_size, progress)  # (2N, d) float64
    f = f.to(torch.float32) if model.config.dtype != "float64" else f  # features are fp32 (bf16/fp16 upcast)
    return f[: len(pairs)].contiguous(), f[len(pairs):].contiguous()


def pair_features(model: RewardModel, pairs: Sequence[Pair], cache_dir: str | Path | None = None,
                  batch_size: int = 32, progress: Callable[[int], None] | None = None,
                  log: Callable[[str], None] | None = None) -> PairFeatures:
    """Reward-token features of every pair's responses, from `cache_dir` when present, else computed and cached.

    The cache file holds the features and, in its metadata, the key they were computed under; a file that is
    unreadable, holds another key (a hash collision) or non-finite values raises DataError naming it.
    """
    from safetensors.torch import safe_open, save_file

    if not pairs:
        raise ValueError("no pairs to compute features for")
    key = feature_key(model, pairs)
    fp = fingerprint(key)
    path = Path(cache_dir) / f"{fp}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        t = load_tensors(path)  # one DataError naming the file if truncated or garbled
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != json.dumps(key, sort_keys=True) or set(t) != {"chosen", "rejected"}:
            raise DataError("feature cache does not match this model and data; delete it to recompute",
                            file=str(path))
        require_finite(t, path)
        if log is not None:
            log(f"features: cache hit {path}")
        return PairFeatures(t["chosen"], t["rejected"], fp)
    if log is not None:
        log(f"features: computing {2 * len(pairs)} responses" + (f" into {path}" if path else ""))
    chosen, rejected = _compute(model, pairs, batch_size, progress)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"chosen": chosen, "rejected": rejected}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True)})
    return PairFeatures(chosen, rejected, fp)
