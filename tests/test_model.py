"""Reward model on tiny encoder/decoder backbones: where the reward is read, save/load, LoRA config, errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bayesrm.model import CONFIG_NAME, Pooling, RewardModel, RMConfig, pool_hidden, resolve_backbone

KINDS = ["bert", "llama", "neox"]
DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "neox": ["query_key_value"]}
PROMPTS = ["What is a cat?", "What is a cat?", "Name a colour."]
RESPONSES = ["A small furry animal.", "cat " * 40, "Blue."]



def _perturb(model: RewardModel, seed: int = 0) -> None:
    """Move the LoRA weights and head away from their init (B = 0 makes a fresh adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_pool_hidden_first_last_mean() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)  # (B, T, d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # right padding
    assert torch.equal(pool_hidden(h, mask, Pooling.FIRST), h[:, 0])
    assert torch.equal(pool_hidden(h, mask, Pooling.LAST), torch.stack([h[0, 3], h[1, 1]]))
    assert torch.allclose(pool_hidden(h, mask, Pooling.MEAN), torch.stack([h[0].mean(0), h[1, :2].mean(0)]))


@pytest.mark.parametrize(("kind", "pooling"), [("bert", Pooling.FIRST), ("llama", Pooling.LAST),
                                               ("neox", Pooling.LAST)])
def test_reward_token_and_padding_invariance(tiny_cfg: Callable[..., RMConfig], kind: str, pooling: Pooling) -> None:
    model = RewardModel(tiny_cfg(kind, template="plain"))
    _perturb(model)
    assert model.pooling is pooling and model.encoder == (kind == "bert")
    alone = model.score(PROMPTS[:1], RESPONSES[:1])
    ids = model.encode(PROMPTS[:2], RESPONSES[:2])
    assert len(ids[1]) > 2 * len(ids[0])  # the batch really pads the short one
    batched = model.score(PROMPTS[:2], RESPONSES[:2], batch_size=2)
    assert torch.allclose(batched[0], alone[0], atol=1e-5), (batched[0], alone[0])
    assert not torch.allclose(batched[1], batched[0], atol=1e-3)


def test_decoder_reads_the_last_real_token(tiny_cfg: Callable[..., RMConfig]) -> None:
    model = RewardModel(tiny_cfg("llama"))
    _perturb(model)
    model.eval()
    ids = torch.tensor([model.encode(PROMPTS[:1], RESPONSES[:1])[0]])  # (1, T)
    with torch.no_grad():
        h = model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (1, T, d)
        expected = model.head(h[:, -1]).squeeze(-1)
        padded = torch.cat([ids, torch.full((1, 5), model.pad_id)], 1)  # (1, T + 5)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=torch.long)], 1)
        got = model(padded, mask)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_scores_and_records_lora(tiny_cfg: Callable[..., RMConfig], tmp_path: Path,
                                                           kind: str) -> None:
    model = RewardModel(tiny_cfg(kind, lora_r=3, lora_alpha=5))
    _perturb(model, seed=1)
    before = model.score(PROMPTS, RESPONSES)
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["target_modules"]) == (3, 5, DEFAULT_TARGETS[kind])
    adapter = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (3, 5, DEFAULT_TARGETS[kind])
    loaded = RewardModel.load(tmp_path / "m")
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), before)
    for name, t in model.lora_init.items():  # the LoRA-A prior mean travels with the model
        assert torch.equal(loaded.lora_init[name], t)
    fresh = RewardModel(tiny_cfg(kind, lora_r=3, lora_alpha=5))
    assert not torch.allclose(fresh.score(PROMPTS, RESPONSES), before)  # the loaded weights matter


def test_custom_target_modules_are_used_and_recorded(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = RewardModel(tiny_cfg("llama", target_modules=targets))
    lora_a = [n for n in model.lora_parameters() if ".lora_A." in n]
    assert len(lora_a) == 2 * len(targets)  # 2 layers
    assert {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in lora_a} == set(targets)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["target_modules"] == targets
    assert RewardModel.load(tmp_path / "m").config.target_modules == targets


def test_only_lora_and_head_are_trainable(tiny_cfg: Callable[..., RMConfig]) -> None:
    model = RewardModel(tiny_cfg("bert"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert "head.weight" in trainable
    assert "head.bias" not in trainable  # a BT loss only sees reward differences, so the bias gets no gradient


@pytest.mark.parametrize("disable", [True, False])
def test_backbone_dropout_switch(tiny_cfg: Callable[..., RMConfig], disable: bool) -> None:
    model = RewardModel(tiny_cfg("bert", disable_dropout=disable)).train()
    x = torch.tensor([model.encode(PROMPTS[:1], RESPONSES[:1])[0]])  # (1, T)
    with torch.no_grad():
        a, b = model(x, torch.ones_like(x)), model(x, torch.ones_like(x))
    assert torch.equal(a, b) == disable  # the default (True) makes training-mode forwards deterministic


def test_bad_model_dirs_give_clear_errors(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a bayesrm model directory"):
        RewardModel.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_NAME):
        RewardModel.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"backbone": "x", "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown model config fields: \['colour'\]"):
        RewardModel.load(tmp_path)
    with pytest.raises(ValueError, match="cannot load backbone"):
        RewardModel(RMConfig(backbone=str(tmp_path / "no-such-backbone")))


def test_embedded_default_backbone_loads_offline_and_scores() -> None:
    start = time.perf_counter()
    assert Path(resolve_backbone("all-MiniLM-L6-v2"), "config.json").is_file()  # shipped weights, no hub
    model = RewardModel(RMConfig(max_length=64))
    assert model.encoder and model.config.target_modules == ["query", "value"]
    scores = model.score(["What is 2+2?", "What is 2+2?"], ["4", "It is four."])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    assert time.perf_counter() - start < 10
