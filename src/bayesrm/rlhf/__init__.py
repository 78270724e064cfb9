"""RLHF overoptimisation experiment (Gao et al. 2022 §3; Coste et al. 2024 §5.5; Yang et al. 2024 §5).

A LoRA policy is trained with TRL's RLOO (or GRPO) against a proxy reward model under one selection spec per run
(MAP, Laplace-penalised, …). Every generation batch is also scored by a stronger gold reward model that never
enters the loss, and the proxy, gold and KL to the reference (the policy with its adapter disabled) are logged
per step. `bayesrm rlhf CONFIG` runs all runs (resuming from TRL checkpoints) and writes results.md, results.json
and rlhf.png (gold and proxy against KL).

Modules: `config` (RLHFConfig), `policy` (policy weights and prompts), `monitor` (the proxy reward with its gold
monitor), `run` (one run and the experiment), `report` (tables and plots).
"""

from __future__ import annotations

from bayesrm.rlhf.config import SMOLLM2, Algorithm, PolicyConfig, RLHFConfig, check_inputs, load_config, validate
from bayesrm.rlhf.monitor import GoldMonitor
from bayesrm.rlhf.policy import policy_path, select_prompts
from bayesrm.rlhf.report import add_prompt_deltas, final_summary, plot_rlhf, results_table
from bayesrm.rlhf.run import run_one, run_rlhf, step_history

__all__ = [
    "SMOLLM2",
    "Algorithm",
    "GoldMonitor",
    "PolicyConfig",
    "RLHFConfig",
    "add_prompt_deltas",
    "check_inputs",
    "final_summary",
    "load_config",
    "plot_rlhf",
    "policy_path",
    "results_table",
    "run_one",
    "run_rlhf",
    "select_prompts",
    "step_history",
    "validate",
]
