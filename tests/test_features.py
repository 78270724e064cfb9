"""Feature cache: hit on an identical key, miss when anything the features depend on changes, loud on damage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import toy_pairs

from bayesrm.features import pair_features
from bayesrm.model import RewardModel


def _model(tiny_cfg, **kw):  # type: ignore[no-untyped-def]
    return RewardModel(tiny_cfg("bert", freeze_backbone=True, **kw))


def _no_compute(model: RewardModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("backbone pass on a cache hit")
    monkeypatch.setattr(model, "per_response", boom)


def test_features_match_the_model_and_cache_hits(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, pairs = _model(tiny_cfg), toy_pairs(6)
    logs: list[str] = []
    f = pair_features(model, pairs, tmp_path, batch_size=4, log=logs.append)
    assert "computing" in logs[-1] and len(list(tmp_path.glob("*.safetensors"))) == 1
    for i in (0, 5):  # the cached rows are model.features of that pair's responses
        ids = model.encode([pairs[i].prompt] * 2, [pairs[i].chosen, pairs[i].rejected])
        for row, expect in zip(ids, (f.chosen[i], f.rejected[i]), strict=True):
            x = torch.tensor([row])
            with torch.no_grad():
                torch.testing.assert_close(model.features(x, torch.ones_like(x))[0], expect, atol=1e-5, rtol=1e-5)
    _no_compute(model, monkeypatch)
    g = pair_features(model, pairs, tmp_path, log=logs.append)
    assert "cache hit" in logs[-1] and g.fingerprint == f.fingerprint
    assert torch.equal(g.chosen, f.chosen) and torch.equal(g.rejected, f.rejected)


def test_lora_seed_of_a_frozen_model_shares_the_cache(tiny_cfg, tmp_path: Path) -> None:
    pairs = toy_pairs(4)
    a = pair_features(_model(tiny_cfg, lora_seed=0), pairs, tmp_path)
    b = pair_features(_model(tiny_cfg, lora_seed=7), pairs, tmp_path)  # B = 0: same function, same features
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("change", ["max_length", "template", "data", "weights", "trained_lora"])
def test_fingerprint_changes_miss(tiny_cfg, tmp_path: Path, change: str) -> None:
    pairs = toy_pairs(4)
    base = pair_features(_model(tiny_cfg), pairs, tmp_path)
    model = _model(tiny_cfg, **({"max_length": 32} if change == "max_length" else
                                {"template": "plain"} if change == "template" else {}))
    if change == "weights":
        with torch.no_grad():
            next(p for n, p in model.backbone.named_parameters() if "lora_" not in n).add_(1e-3)
    if change == "trained_lora":
        with torch.no_grad():
            next(p for n, p in model.backbone.named_parameters() if ".lora_B." in n).fill_(0.01)
    data = toy_pairs(4, seed=1) if change == "data" else pairs
    logs: list[str] = []
    other = pair_features(model, data, tmp_path, log=logs.append)
    assert other.fingerprint != base.fingerprint and "computing" in logs[-1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_damaged_cache_names_the_file(tiny_cfg, tmp_path: Path) -> None:
    model, pairs = _model(tiny_cfg), toy_pairs(4)
    f = pair_features(model, pairs, tmp_path)
    path = tmp_path / f"{f.fingerprint}.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=str(path.name)):
        pair_features(model, pairs, tmp_path)
