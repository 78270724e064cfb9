"""Best-of-n candidate pools: n responses per prompt, optionally with a gold reward per response."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bayesrm.data import DataError, iter_rows
from bayesrm.io import write_jsonl

ALPACA_WEIGHTED = "weighted_alpaca_eval_gpt4_turbo"


@dataclass
class Pool:
    """Prompts with their candidate responses (and gold rewards where known), in a fixed order."""

    prompts: list[str]
    responses: list[list[str]]  # responses[p] = candidates of prompt p
    gold: list[list[float]] | None = None  # same shape as responses
    generators: list[list[str]] | None = None  # which policy produced each candidate
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def sizes(self) -> list[int]:
        return [len(r) for r in self.responses]

    def subset(self, prompt_indices: Iterable[int]) -> Pool:
        """The pool restricted to some prompts (order as given)."""
        idx = list(prompt_indices)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Pool([self.prompts[i] for i in idx], [self.responses[i] for i in idx], pick(self.gold),
                    pick(self.generators), dict(self.meta))

    def flat(self) -> tuple[list[str], list[str]]:
        """(prompts, responses) flattened prompt-major, for scoring."""
        ps = [p for p, rs in zip(self.prompts, self.responses, strict=True) for _ in rs]
        return ps, [r for rs in self.responses for r in rs]

    def unflatten(self, values: Iterable[float]) -> list[list[float]]:
        """Inverse of `flat` for per-candidate values."""
        it = iter(values)
        return [[float(next(it)) for _ in rs] for rs in self.responses]

    def save_jsonl(self, path: str | Path) -> None:
        """One row per candidate: prompt, response, gold?, generator?."""
        rows = []
        for i, (p, rs) in enumerate(zip(self.prompts, self.responses, strict=True)):
            for j, r in enumerate(rs):
                row: dict[str, Any] = {"prompt": p, "response": r}
                if self.gold is not None:
                    row["gold"] = self.gold[i][j]
                if self.generators is not None:
                    row["generator"] = self.generators[i][j]
                rows.append(row)
        write_jsonl(path, rows)


def load_pool(path: str | Path, min_size: int = 2) -> Pool:
    """Read a pool from jsonl/csv/parquet rows with `prompt`, `response` and optional `gold`, `generator`."""
    by_prompt: dict[str, list[tuple[str, float | None, str | None]]] = defaultdict(list)
    for line, row in iter_rows(path):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise DataError("missing or not text", file=str(path), line=line, field=key)
        gold = row.get("gold")
        if gold is not None and not isinstance(gold, int | float):
            raise DataError(f"expected a number, got {gold!r}", file=str(path), line=line, field="gold")
        by_prompt[row["prompt"]].append((row["response"], None if gold is None else float(gold), row.get("generator")))
    prompts = [p for p, c in by_prompt.items() if len(c) >= min_size]
    if not prompts:
        raise DataError(f"no prompt has at least {min_size} candidates", file=str(path))
    has_gold = all(g is not None for p in prompts for _, g, _ in by_prompt[p])
    return Pool(prompts, [[r for r, _, _ in by_prompt[p]] for p in prompts],
                [[float(g) for _, g, _ in by_prompt[p]] for p in prompts] if has_gold else None,  # type: ignore[arg-type]
                [[str(s) for _, _, s in by_prompt[p]] for p in prompts], {"source": str(path)})


NULL_MODELS = ("example",)  # AlpacaEval's adversarial constant-output entry (a judge exploit)


def alpaca_eval_pool(data_dir: str | Path, annotator: str = ALPACA_WEIGHTED, min_size: int = 8,
                     exclude_generators: Sequence[str] = NULL_MODELS) -> Pool:
    """AlpacaEval pool: per prompt, every annotated model's output with a GPT-4-turbo judged gold reward.

    Gold = preference − 1 = P(output beats the gpt4_1106_preview reference) from the weighted judge
    (AlpacaEval 2). The pool is a *mixture policy* over the annotated models, not samples of one policy.
    Empty outputs and the outputs of `exclude_generators` are dropped: by default the adversarial "null model"
    (generator `example`: the same nonsense string for every prompt) that the judge rates ~0.85 — a judge
    exploit, not a response, which any proxy that learns it selects at large n.
    """
    exclude = set(exclude_generators)
    path = Path(data_dir) / "alpaca_eval" / "annotations.jsonl.gz"
    if not path.exists():
        raise DataError("AlpacaEval annotations not found (pass --data-dir pointing at shared/data)", file=str(path))
    cands: dict[str, list[tuple[str, float, str]]] = defaultdict(list)
    order: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("annotator") != annotator or row.get("preference") is None:
                continue
            out = row.get("output_2")
            if not isinstance(out, str) or not out.strip() or str(row.get("generator_2")) in exclude:
                continue
            prompt = row["instruction"]
            if prompt not in cands:
                order.append(prompt)
            cands[prompt].append((out, float(row["preference"]) - 1.0, str(row.get("generator_2"))))
    prompts = [p for p in order if len(cands[p]) >= min_size]
    return Pool(prompts, [[c[0] for c in cands[p]] for p in prompts], [[c[1] for c in cands[p]] for p in prompts],
                [[c[2] for c in cands[p]] for p in prompts],
                {"source": str(path), "annotator": annotator, "policy": "mixture of AlpacaEval models",
                 "gold": "P(beats gpt4_1106_preview), GPT-4-turbo weighted judge",
                 "excluded_generators": sorted(exclude)})
