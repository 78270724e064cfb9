"""Tests for bayesrm.sensitivity: the derangement, the metric against brute force, and a prompt-blind model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesrm.sensitivity import measure_prompt_sensitivity, prompt_sensitivity, swap_prompts


def test_swap_prompts_is_a_derangement_over_distinct_prompts() -> None:
    prompts = ["a", "b", "a", "c", "d", "b"]
    for seed in range(20):
        sw = swap_prompts(prompts, seed)
        assert all(x != y for x, y in zip(prompts, sw, strict=True))
        assert set(sw) <= set(prompts)
        same = {p: {s for q, s in zip(prompts, sw, strict=True) if q == p} for p in prompts}
        assert all(len(v) == 1 for v in same.values())  # a function of the prompt
    with pytest.raises(ValueError, match="two distinct"):
        swap_prompts(["a", "a"])


def test_prompt_sensitivity_counts_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    own = torch.tensor(rng.integers(0, 4, 200), dtype=torch.double)
    swap = torch.tensor(rng.integers(0, 4, 200), dtype=torch.double)
    sd_own, sd_swap = torch.rand(200, dtype=torch.double), torch.rand(200, dtype=torch.double) + 0.3
    out = prompt_sensitivity(own, swap, sd_own, sd_swap)
    higher = sum(float(a) > float(b) for a, b in zip(own, swap, strict=True)) / 200
    ties = sum(float(a) == float(b) for a, b in zip(own, swap, strict=True)) / 200
    pairs = [(float(s), float(o)) for s in sd_swap for o in sd_own]
    brute = sum(1.0 if s > o else 0.5 if s == o else 0.0 for s, o in pairs) / len(pairs)
    assert out["own_prompt_higher"] == pytest.approx(higher) and out["ties"] == pytest.approx(ties)
    assert out["sigma_auroc_swapped"] == pytest.approx(brute)


def test_a_prompt_blind_model_ties_and_a_reader_wins() -> None:
    prompts = [f"q{i % 5}" for i in range(20)]
    responses = [f"answer to q{i % 5}" for i in range(20)]

    def blind(ps: list[str], rs: list[str]) -> tuple[torch.Tensor, None]:
        return torch.tensor([float(len(r)) for r in rs]), None

    def reader(ps: list[str], rs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        match = torch.tensor([float(r.endswith(p)) for p, r in zip(ps, rs, strict=True)])
        return match, 1.0 - match  # unsure where prompt and answer disagree

    b = measure_prompt_sensitivity(blind, prompts, responses)
    assert (b["own_prompt_higher"], b["ties"]) == (0.0, 1.0)
    r = measure_prompt_sensitivity(reader, prompts, responses)
    assert (r["own_prompt_higher"], r["ties"], r["sigma_auroc_swapped"]) == (1.0, 0.0, 1.0)
