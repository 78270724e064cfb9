"""Prompt-disjoint AlpacaEval judged pairs shared by `benchmarks/heads_vs_rewarduq.py` and `active_labelling.py`.

Pairs are the GPT-4-turbo (weighted) judge's verdicts between the reference gpt4_1106_preview output and another
model's output (`bayesrm.data.load_pairs`; ties dropped, rows with an empty output skipped, the adversarial null
model excluded as in `bayesrm.pool`). `n_test` prompts are held out with one pair each; the pool takes pairs from the
remaining prompts round-robin (one per prompt, then a second per prompt, ...), so its first len(prompts) pairs have
distinct prompts. Both lists are deterministic in `seed`, so the feature cache is shared by both scripts.
"""

from __future__ import annotations

import random
from collections import defaultdict

from bayesrm.data import Pair, load_pairs
from bayesrm.pool import NULL_MODELS

DATA = "/work/shared/data/alpaca_eval/annotations.jsonl.gz"


def judged_split(n_pool: int, n_test: int, seed: int = 0, data: str = DATA) -> tuple[list[Pair], list[Pair]]:
    """(pool, test): `n_pool` pairs from training prompts and one pair for each of `n_test` held-out prompts."""
    pairs = [p for p in load_pairs(data, skip_invalid=True) if p.meta.get("generator_2") not in NULL_MODELS]
    by_prompt: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_prompt[pair.prompt].append(pair)
    rng = random.Random(seed)
    prompts = sorted(by_prompt)
    rng.shuffle(prompts)
    for p in prompts:
        rng.shuffle(by_prompt[p])
    test = [by_prompt[p][0] for p in prompts[:n_test]]
    train_prompts = prompts[n_test:]
    pool: list[Pair] = []
    for r in range(max(len(v) for v in by_prompt.values())):
        pool += [by_prompt[p][r] for p in train_prompts if r < len(by_prompt[p])]
        if len(pool) >= n_pool:
            break
    if len(pool) < n_pool:
        raise ValueError(f"only {len(pool)} pool pairs available, {n_pool} asked")
    return pool[:n_pool], test
