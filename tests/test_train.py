"""BT training on tiny backbones: learning, seeds, exact resume, metrics, accumulation; the loss terms."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import toy_pairs

from bayesrm.losses import bradley_terry_loss, centering_penalty
from bayesrm.model import RewardModel, RMConfig
from bayesrm.train import (
    CHECKPOINT_DIR,
    METRICS_NAME,
    MODEL_DIR,
    TrainConfig,
    bf16_is_native,
    epoch_batches,
    evaluate,
    pair_loss,
    train,
)

FAST = TrainConfig(epochs=2, lr=2e-2, batch_size=4, warmup_ratio=0.0, checkpoint_every=0)
Weights = dict[str, torch.Tensor]



def _all_weights(model: RewardModel) -> Weights:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fit(tiny_cfg: Callable[..., RMConfig], out: Path, cfg: TrainConfig = FAST, kind: str = "bert",
         n: int = 24, **kw: Any) -> RewardModel:
    """A fresh tiny model trained on `n` toy pairs (kw: eval_pairs, resume, on_step).

    Backbone dropout is kept on (bert: 0.1), so runs are reproducible only if train() seeds and checkpoints the RNG.
    """
    model = RewardModel(tiny_cfg(kind, template="plain", disable_dropout=False))
    train(model, toy_pairs(n), cfg, out, show_progress=False, **kw)
    return model


def _assert_same(a: Weights, b: Weights) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- learning


def test_training_learns_and_changes_only_trainable_weights(tiny_cfg: Callable[..., RMConfig],
                                                            tmp_path: Path) -> None:
    model = RewardModel(tiny_cfg("bert", template="plain"))
    pairs, held_out = toy_pairs(24), toy_pairs(16, seed=1)
    before, start = _all_weights(model), evaluate(model, pairs)
    history = train(model, pairs, TrainConfig(epochs=3, lr=2e-2, batch_size=4, warmup_ratio=0.0), tmp_path,
                    eval_pairs=held_out, show_progress=False)
    end, after = evaluate(model, pairs), _all_weights(model)
    assert end["nll"] < start["nll"] - 0.02 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert end["accuracy"] >= 0.9 > 0.5 and history[-1]["eval_accuracy"] >= 0.75  # well above chance
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    for name, w in after.items():
        changed = not torch.equal(w, before[name])
        assert changed == (name in trainable), name  # every LoRA matrix and the head moved; the base did not


def test_training_a_decoder(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = RewardModel(tiny_cfg("llama", template="plain"))
    start = evaluate(model, toy_pairs(24))["nll"]
    train(model, toy_pairs(24), FAST, tmp_path, show_progress=False)
    assert evaluate(model, toy_pairs(24))["nll"] < start - 0.1
    assert torch.equal(RewardModel.load(tmp_path).score(["q"], ["good kind"]), model.score(["q"], ["good kind"]))


def test_bf16_autocast_runs(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = RewardModel(tiny_cfg("llama", template="plain"))
    head = model.head.weight.detach().clone()
    cfg = TrainConfig(batch_size=4, lr=1e-2, mixed_precision="bf16")
    if bf16_is_native(torch.device("cpu")):
        hist = train(model, toy_pairs(8), cfg, tmp_path, show_progress=False)
    else:  # no oneDNN bf16 on this CPU: warn and fall back to fp32 instead of running ~20x slower
        with pytest.warns(RuntimeWarning, match="training in fp32"):
            hist = train(model, toy_pairs(8), cfg, tmp_path, show_progress=False)
    assert math.isfinite(hist[0]["train_loss"]) and not torch.equal(model.head.weight, head)


# --------------------------------------------------------------------------- seeds and data order


def test_same_seeds_give_identical_weights(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    a = _fit(tiny_cfg, tmp_path / "a")  # bert with dropout on: its RNG must be seeded by train()
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    b = _fit(tiny_cfg, tmp_path / "b")
    _assert_same(a.trainable_state(), b.trainable_state())
    c = _fit(tiny_cfg, tmp_path / "c", dataclasses.replace(FAST, data_seed=1))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_train_leaves_the_callers_rng_alone(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = RewardModel(tiny_cfg("bert", disable_dropout=False))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, toy_pairs(8), TrainConfig(batch_size=4, lr=1e-2), tmp_path, show_progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_lora_seed_controls_the_init(tiny_cfg: Callable[..., RMConfig]) -> None:
    a, b = RewardModel(tiny_cfg("bert", lora_seed=0)), RewardModel(tiny_cfg("bert", lora_seed=0))
    c = RewardModel(tiny_cfg("bert", lora_seed=1))
    _assert_same(a.trainable_state(), b.trainable_state())
    lora_a = [n for n in a.trainable_state() if ".lora_A." in n]
    assert lora_a and all(not torch.equal(a.trainable_state()[n], c.trainable_state()[n]) for n in lora_a)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert all(not p.any() for n, p in a.trainable_state().items() if ".lora_B." in n)  # B = 0: a no-op adapter


def test_epoch_batches_order_depends_on_data_seed_and_epoch() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    a = epoch_batches(lengths, 4, seed=0, epoch=0, group_by_length=False)
    assert a == epoch_batches(lengths, 4, seed=0, epoch=0, group_by_length=False)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=0, group_by_length=False)
    assert a != epoch_batches(lengths, 4, seed=0, epoch=1, group_by_length=False)
    for group in (False, True):
        batches = epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(50))
        assert sum(len(b) < 4 for b in batches) == 1


def test_length_grouping_makes_batches_of_similar_length() -> None:
    lengths = [(37 * i) % 100 + 1 for i in range(64)]

    def spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert spread(grouped) < 0.25 * spread(epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=False))
    assert grouped != sorted(grouped, key=lambda b: -lengths[b[0]])  # batch order is shuffled, not longest-first
    assert grouped != epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)


# --------------------------------------------------------------------------- checkpoints and resume


class _Kill(Exception):
    pass


def _killer(at: int) -> Callable[[int, float], None]:
    def on_step(step: int, _loss: float) -> None:
        if step == at:
            raise _Kill
    return on_step


def test_train_says_whether_it_resumes_or_starts_fresh(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    """Before: a rerun without a checkpoint started over silently."""
    cfg = TrainConfig(epochs=1, lr=2e-2, batch_size=4, checkpoint_every=2)  # 24 pairs: 6 steps
    ck, lines = tmp_path / "run" / CHECKPOINT_DIR, []
    with pytest.raises(_Kill):
        _fit(tiny_cfg, tmp_path / "run", cfg, on_step=_killer(4), resume=True, log=lines.append)
    _fit(tiny_cfg, tmp_path / "run", cfg, resume=True, log=lines.append)
    _fit(tiny_cfg, tmp_path / "run", cfg, resume=False, log=lines.append)
    assert lines == [f"starting fresh: no checkpoint in {ck}", f"resuming from {ck} (step 2 of 6)",
                     f"starting fresh (resume not requested): removed the earlier checkpoint in {ck}"]


@pytest.mark.parametrize("kill_at", [3, 7, 9])  # 6 steps per epoch: resume at steps 2, 6 (epoch end) and 8
def test_resume_after_kill_matches_uninterrupted_run(tiny_cfg: Callable[..., RMConfig], tmp_path: Path,
                                                     kill_at: int) -> None:
    cfg = TrainConfig(epochs=2, lr=2e-2, batch_size=4, warmup_ratio=0.25, checkpoint_every=2)
    held_out = toy_pairs(8, seed=2)
    ref = _fit(tiny_cfg, tmp_path / "ref", cfg, eval_pairs=held_out)
    with pytest.raises(_Kill):
        _fit(tiny_cfg, tmp_path / "run", cfg, eval_pairs=held_out, on_step=_killer(kill_at))
    state = json.loads((tmp_path / "run" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == (kill_at - 1) // 2 * 2  # the last checkpoint before the kill
    resumed = _fit(tiny_cfg, tmp_path / "run", cfg, eval_pairs=held_out, resume=True)
    # bitwise equal: same data order, AdamW moments, schedule position and dropout RNG state, and the
    # same sequence of float ops on one thread (no tolerance needed)
    _assert_same(resumed.trainable_state(), ref.trainable_state())
    for name in ("ref", "run"):
        assert (tmp_path / name / MODEL_DIR / "bayesrm.json").exists()
    assert (tmp_path / "run" / METRICS_NAME).read_text() == (tmp_path / "ref" / METRICS_NAME).read_text()


def test_resume_refuses_a_different_run_and_fresh_runs_drop_old_checkpoints(tiny_cfg: Callable[..., RMConfig],
                                                                            tmp_path: Path) -> None:
    cfg = TrainConfig(lr=1e-2, batch_size=4, checkpoint_every=1)
    with pytest.raises(_Kill):
        _fit(tiny_cfg, tmp_path, cfg, on_step=_killer(2))
    with pytest.raises(ValueError, match="other data or settings"):
        _fit(tiny_cfg, tmp_path, TrainConfig(lr=5e-3, batch_size=4, checkpoint_every=1), resume=True)
    with pytest.raises(ValueError, match="other data or settings"):
        _fit(tiny_cfg, tmp_path, cfg, n=20, resume=True)
    with pytest.raises(_Kill):  # a fresh run (resume=False) must not leave the old checkpoint behind
        _fit(tiny_cfg, tmp_path, TrainConfig(lr=5e-3, batch_size=4, checkpoint_every=0), on_step=_killer(1))
    assert not (tmp_path / CHECKPOINT_DIR).exists() and not (tmp_path / METRICS_NAME).exists()


def test_metrics_jsonl_has_eval_accuracy_and_nll_per_epoch(tiny_cfg: Callable[..., RMConfig],
                                                           tmp_path: Path) -> None:
    held_out = toy_pairs(8, seed=3)
    model = _fit(tiny_cfg, tmp_path, FAST, eval_pairs=held_out)
    rows = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [6, 12]
    for r in rows:
        assert (r["eval_accuracy"] * 16).is_integer() and r["eval_nll"] > 0 and r["eval_n"] == 8  # ties count half
    final = evaluate(model, held_out)
    assert rows[-1]["eval_accuracy"] == final["accuracy"] and rows[-1]["eval_nll"] == pytest.approx(final["nll"])
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["n_train"] == 24 and saved["n_eval"] == 8


def test_bad_train_config(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grad_accum must be at least 1"):
        _fit(tiny_cfg, tmp_path, TrainConfig(grad_accum=0))
    with pytest.raises(ValueError, match="mixed_precision"):
        _fit(tiny_cfg, tmp_path, TrainConfig(mixed_precision="fp8"))
    with pytest.raises(ValueError, match="no training pairs"):
        train(RewardModel(tiny_cfg("bert")), [], FAST, tmp_path, show_progress=False)


# --------------------------------------------------------------------------- accumulation


def test_grad_accumulation_matches_a_big_batch(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    # two AdamW steps: the first update is ≈ lr·sign(g) whatever the batch, the second depends on gradient sizes
    kw: dict[str, Any] = dict(lr=1e-2, warmup_ratio=0.0, max_grad_norm=0.0, group_by_length=False, max_steps=2)
    big = _fit(tiny_cfg, tmp_path / "big", TrainConfig(batch_size=8, **kw), kind="llama", n=16)
    acc = _fit(tiny_cfg, tmp_path / "acc", TrainConfig(batch_size=4, grad_accum=2, **kw), kind="llama", n=16)
    small = _fit(tiny_cfg, tmp_path / "small", TrainConfig(batch_size=4, **kw), kind="llama", n=16)
    init = RewardModel(tiny_cfg("llama")).trainable_state()
    b, a, s = big.trainable_state(), acc.trainable_state(), small.trainable_state()
    # llama has no dropout; 2×4 and 1×8 see the same 8 pairs per step and differ only in float summation order.
    # The head bias is left out: BT only sees r_w − r_l, so its gradient is 0 up to rounding, and Adam's
    # normalisation turns that rounding noise into a ±lr step (it shifts every reward alike, changing no Δ).
    for k in b.keys() - {"head.bias"}:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert not torch.equal(b["head.weight"], init["head.weight"])
    assert not torch.allclose(s["head.weight"], b["head.weight"], rtol=0, atol=1e-4)  # batch 4 alone differs


def test_short_last_accumulation_group_still_steps(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    steps: list[int] = []
    model = RewardModel(tiny_cfg("llama"))
    head = model.head.weight.detach().clone()
    # 3 micro-batches per epoch with grad_accum=2: one full group and one short one → 2 steps per epoch
    train(model, toy_pairs(12), TrainConfig(epochs=2, batch_size=4, grad_accum=2, lr=1e-2), tmp_path,
          on_step=lambda s, _: steps.append(s), show_progress=False)
    assert steps == [1, 2, 3, 4] and not torch.equal(model.head.weight, head)
    steps.clear()  # fewer micro-batches than grad_accum: still one step per epoch
    train(RewardModel(tiny_cfg("llama")), toy_pairs(4), TrainConfig(epochs=2, batch_size=4, grad_accum=4),
          tmp_path, on_step=lambda s, _: steps.append(s), show_progress=False)
    assert steps == [1, 2]


# --------------------------------------------------------------------------- loss terms (pure functions)


def test_bradley_terry_loss_values_and_margin() -> None:
    rw, rl = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, -1.0])
    expected = torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(-4.0))])
    assert torch.allclose(bradley_terry_loss(rw, rl), expected)
    # a margin m shifts the difference: −log σ(Δ − m), so Δ = m costs log 2 and the loss grows with m
    assert torch.allclose(bradley_terry_loss(rw, rl, 1.0)[0], torch.tensor(math.log(2.0)))
    assert (bradley_terry_loss(rw, rl, 0.5) > bradley_terry_loss(rw, rl)).all()
    per_pair = torch.tensor([1.0, 0.0, 4.0])
    assert torch.allclose(bradley_terry_loss(rw, rl, per_pair), torch.full((3,), math.log(2.0)))
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)  # stable


def test_centering_penalty_and_combined_loss() -> None:
    rw, rl = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(centering_penalty(rw, rl), torch.tensor([16.0, 0.0]))
    # the BT term only sees r_w − r_l; a shared shift c changes the loss only through (r_w + r_l + 2c)²
    base = pair_loss(rw, rl, TrainConfig())
    assert torch.allclose(pair_loss(rw + 5, rl + 5, TrainConfig()), base)
    cfg = TrainConfig(center_coef=0.1, margin=0.5)
    assert torch.allclose(pair_loss(rw, rl, cfg), bradley_terry_loss(rw, rl, 0.5) + 0.1 * torch.tensor([16.0, 0.0]))
    shift = torch.tensor(0.0, requires_grad=True)
    pair_loss(rw + shift, rl + shift, TrainConfig(center_coef=1.0)).sum().backward()
    assert shift.grad is not None and shift.grad.item() == pytest.approx(2 * 2 * 4.0)  # d/dc Σ(s + 2c)² at c=0


def test_train_on_features_equals_train_with_a_frozen_backbone(tiny_cfg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fast path reproduces `train`'s frozen-backbone trajectory: same batches, AdamW, schedule, accumulation."""
    from bayesrm.train import train_on_features

    pairs, ev = toy_pairs(18), toy_pairs(6, seed=9)
    cfg = TrainConfig(epochs=2, batch_size=4, grad_accum=2, lr=5e-2, warmup_ratio=0.2, margin=0.1, center_coef=0.01,
                      max_grad_norm=0.5, checkpoint_every=0)
    slow, fast = (RewardModel(tiny_cfg("bert", freeze_backbone=True)) for _ in range(2))
    h_slow = train(slow, pairs, cfg, tmp_path / "slow", eval_pairs=ev, show_progress=False)
    h_fast = train_on_features(fast, pairs, cfg, tmp_path / "fast", eval_pairs=ev, cache_dir=tmp_path / "cache")
    assert not torch.allclose(fast.head.weight, RewardModel(tiny_cfg("bert", freeze_backbone=True)).head.weight)
    torch.testing.assert_close(fast.head.weight, slow.head.weight, atol=1e-5, rtol=1e-4)
    for a, b in zip(h_fast, h_slow, strict=True):
        assert a["step"] == b["step"]
        for k in ("train_loss", "eval_accuracy", "eval_nll"):
            assert a[k] == pytest.approx(b[k], abs=1e-5)
    again = RewardModel.load(tmp_path / "fast" / "model")
    torch.testing.assert_close(again.head.weight, fast.head.weight)
