"""Gold rewards for overoptimisation experiments: judged data, any reward model, and gold-labelled pairs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesrm.data import Pair
from bayesrm.pool import Pool
from bayesrm.run import CONFIG_NAME, RunDir


class RewardModelGold:
    """A reward model as gold: a bayesrm model directory, or an HF sequence-classification RM by id/path."""

    def __init__(self, name: str, batch_size: int = 16, max_length: int = 1024) -> None:
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        p = Path(name)
        self._bayesrm: Any = None
        self._hf: Any = None
        if RunDir.of(p).has_model:
            from bayesrm.model import RewardModel

            self._bayesrm = RewardModel.load(p)
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(name)
                self._hf = AutoModelForSequenceClassification.from_pretrained(name).eval()
            except OSError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"gold reward model '{name}': not a bayesrm model directory (no {CONFIG_NAME}) and "
                                 f"not loadable as an HF reward model ({first})") from None

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if self._bayesrm is not None:
            return self._bayesrm.score(prompts, responses, self.batch_size).double().numpy()
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ps, rs = list(prompts[s:s + self.batch_size]), list(responses[s:s + self.batch_size])
            if getattr(self._tok, "chat_template", None):
                texts = [self._tok.apply_chat_template([{"role": "user", "content": p},
                                                        {"role": "assistant", "content": r}], tokenize=False)
                         for p, r in zip(ps, rs, strict=True)]
                enc = self._tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            else:
                enc = self._tok(ps, rs, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            out.append(self._hf(**enc).logits[:, 0].double())
        return torch.cat(out).numpy()


class NoiseMode(str, Enum):
    """How label noise is injected (Coste et al. 2024 mislabel 25%)."""

    FLIP = "flip"  # flip exactly round(ρ·N) labels, chosen at random
    RANDOMIZE = "randomize"  # replace a fraction 2ρ of labels by coin flips (≈ρ wrong in expectation)


def label_pairs_from_gold(pool: Pool, pairs_per_prompt: int, noise: float = 0.0,
                          noise_mode: NoiseMode | str = NoiseMode.FLIP, seed: int = 0) -> list[Pair]:
    """Synthetic preference data (Gao et al. 2022): random candidate pairs of a prompt, higher gold wins.

    Pairs with equal gold are skipped. Noisy labels are recorded in `meta['flipped']`.
    """
    if pool.gold is None:
        raise ValueError("the pool has no gold rewards to label pairs with")
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"label noise must be in [0, 0.5], got {noise}")
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for i, (prompt, resps, gold) in enumerate(zip(pool.prompts, pool.responses, pool.gold, strict=True)):
        cand = [(a, b) for a in range(len(resps)) for b in range(a + 1, len(resps)) if gold[a] != gold[b]
                and resps[a] != resps[b]]
        for a, b in rng.sample(cand, min(pairs_per_prompt, len(cand))):
            win, lose = (a, b) if gold[a] > gold[b] else (b, a)
            pairs.append(Pair(prompt, resps[win], resps[lose], id=f"p{i}:{win}>{lose}", source="gold",
                              meta={"gold_margin": gold[win] - gold[lose], "flipped": False}))
    mode = NoiseMode(noise_mode)
    if mode is NoiseMode.FLIP:
        flip = set(rng.sample(range(len(pairs)), round(noise * len(pairs))))
    else:
        flip = {i for i in range(len(pairs)) if rng.random() < 2 * noise and rng.random() < 0.5}
    return [Pair(p.prompt, p.rejected, p.chosen, p.id, p.source, p.meta | {"flipped": True}) if i in flip else p
            for i, p in enumerate(pairs)]
