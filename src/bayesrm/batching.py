"""Batching: the one place that turns pairs and responses into padded, length-sorted model inputs.

Training, the Laplace fit and every scorer (MAP, Laplace predictive, ensemble members, head moments) get their
batches here, so padding, ordering and device placement are decided once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from bayesrm.data import Pair


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask), both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to avoid padding waste."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def scoring_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device | str
                    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, input_ids (B, T), mask (B, T)) over length-sorted batches of tokenised responses, on `device`.

    Write results back with `out[idx] = ...` to keep the input order.
    """
    for idx in length_sorted_batches([len(s) for s in ids], batch_size):
        x, m = collate([ids[i] for i in idx], pad_id)
        yield idx, x.to(device), m.to(device)


def encode_pairs(model: Any, pairs: Sequence[Pair]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the chosen and of the rejected responses, with the model's template and truncation."""
    prompts = [p.prompt for p in pairs]
    return model.encode(prompts, [p.chosen for p in pairs]), model.encode(prompts, [p.rejected for p in pairs])


def pair_rows(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
              device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded batch of 2B rows: the B chosen responses, then the B rejected ones, (2B, T) each."""
    x, m = collate([*chosen, *rejected], pad_id)
    return x.to(device), m.to(device)


def pair_batches(model: Any, pairs: Sequence[Pair], batch_size: int
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(B, input_ids, mask) per chunk of B pairs in order: rows 0..B−1 chosen, B..2B−1 rejected, on model.device."""
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        chosen, rejected = encode_pairs(model, chunk)
        yield len(chunk), *pair_rows(chosen, rejected, model.pad_id, model.device)
