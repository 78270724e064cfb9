"""Prompt sensitivity: does the reward model read the prompt? (issue 18)

A response written for prompt x should score higher under x than under a different prompt x'. With a
derangement x' = x_π(i) over distinct prompts, `prompt_sensitivity` reports P(r(x, y) > r(x', y)), the share of
exact ties (a prompt-blind model, e.g. one whose truncation cut the prompt away, ties everywhere), and how well σ
flags the swapped inputs (AUROC of σ(x', y) against σ(x, y)).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bayesrm.metrics import auroc


def swap_prompts(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """A different prompt for every position: a seeded derangement over the distinct prompts (≥ 2 needed)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError("prompt sensitivity needs at least two distinct prompts")
    order = distinct[:]
    random.Random(seed).shuffle(order)
    nxt = {p: order[(i + 1) % len(order)] for i, p in enumerate(order)}  # one cycle: nxt[p] ≠ p for every p
    return [nxt[p] for p in prompts]


def prompt_sensitivity(r_own: torch.Tensor, r_swap: torch.Tensor, sd_own: torch.Tensor | None = None,
                       sd_swap: torch.Tensor | None = None) -> dict[str, float]:
    """P(r(x,y) > r(x',y)) with ties counted apart, mean gap, and the AUROC of σ for the swapped input (issue 18)."""
    own, swap = r_own.double(), r_swap.double()
    if own.shape != swap.shape or own.numel() == 0:
        raise ValueError(f"need equal, non-empty reward vectors, got {tuple(own.shape)} and {tuple(swap.shape)}")
    out = {"own_prompt_higher": float((own > swap).double().mean()), "ties": float((own == swap).double().mean()),
           "mean_gap": float((own - swap).mean()), "n": float(own.numel())}
    if sd_own is not None and sd_swap is not None:
        out["sigma_auroc_swapped"] = auroc(np.asarray(sd_swap.double()), np.asarray(sd_own.double()))
    return out


def measure_prompt_sensitivity(predict: Callable[[list[str], list[str]], tuple[torch.Tensor, torch.Tensor | None]],
                               prompts: Sequence[str], responses: Sequence[str], seed: int = 0) -> dict[str, float]:
    """`prompt_sensitivity` of a predictor (prompts, responses) → (mean, var or None), own vs swapped prompts."""
    swapped = swap_prompts(prompts, seed)
    n = len(prompts)
    mu, var = predict([*prompts, *swapped], [*responses, *responses])  # one batched call for both
    sd = None if var is None else var.clamp_min(0).sqrt()
    return prompt_sensitivity(mu[:n], mu[n:], None if sd is None else sd[:n], None if sd is None else sd[n:])
