"""Tests for bayesrm.batching: padding, length-sorted order, pair layout."""

from __future__ import annotations

import random

import torch
from conftest import toy_pairs

from bayesrm.batching import collate, length_sorted_batches, pair_batches, scoring_batches
from bayesrm.model import RewardModel


def test_collate_right_pads() -> None:
    ids, mask = collate([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert ids.dtype == mask.dtype == torch.long


def test_length_sorted_batches_cover_every_index_once() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(103)]
    batches = length_sorted_batches(lengths, 8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 103 % 8
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # similar lengths share a batch


def test_scoring_and_pair_batches_cover_inputs_in_the_documented_layout(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    model = RewardModel(tiny_cfg("bert"))
    pairs = toy_pairs(7)
    ids = model.encode([p.prompt for p in pairs], [p.chosen for p in pairs])
    seen = []
    for idx, x, m in scoring_batches(ids, 3, model.pad_id, "cpu"):
        seen += idx
        for row, i in enumerate(idx):
            assert x[row, : int(m[row].sum())].tolist() == ids[i]
    assert sorted(seen) == list(range(7))
    chunks = list(pair_batches(model, pairs, 3))
    assert [b for b, _, _ in chunks] == [3, 3, 1]
    _, x, m = chunks[0]
    chosen = model.encode([p.prompt for p in pairs[:3]], [p.chosen for p in pairs[:3]])
    rejected = model.encode([p.prompt for p in pairs[:3]], [p.rejected for p in pairs[:3]])
    for row, want in enumerate(chosen + rejected):
        assert x[row, : int(m[row].sum())].tolist() == want
    assert torch.all(m.sum(1) > 0)
