"""The BoN experiment pipeline end to end on a tiny backbone and a toy gold-labelled pool."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesrm.data import DataError
from bayesrm.experiment import BonConfig, load_config, run_bon
from bayesrm.laplace import LaplaceConfig
from bayesrm.model import RewardModel
from bayesrm.pool import Pool
from bayesrm.run import POSTERIOR_DIR
from bayesrm.train import TrainConfig

GOOD, BAD = ["good", "great", "clear", "kind"], ["bad", "awful", "vague", "rude"]


def toy_gold_pool(n_prompts: int = 16, n: int = 8, seed: int = 0) -> Pool:
    rng = random.Random(seed)
    prompts, responses, gold = [], [], []
    for i in range(n_prompts):
        prompts.append(f"question number {i}")
        rs, gs = [], []
        for _ in range(n):
            k = rng.randint(0, 5)
            words = [rng.choice(GOOD) for _ in range(k)] + [rng.choice(BAD) for _ in range(5 - k)]
            rng.shuffle(words)
            rs.append(" ".join(words) + f" {len(rs)}")
            gs.append(float(k))
        responses.append(rs)
        gold.append(gs)
    return Pool(prompts, responses, gold)


@pytest.fixture
def cfg(tmp_path: Path, tiny_cfg) -> BonConfig:  # type: ignore[no-untyped-def]
    pool_file = tmp_path / "pool.jsonl"
    toy_gold_pool(12, 6).save_jsonl(pool_file)
    return BonConfig(pool=str(pool_file), train_frac=0.5, val_frac=0.2, pairs_per_prompt=4, label_noise=0.1,
                     members=2, k_sweep=[1.0, 4.0], n_boot=50, model=tiny_cfg("bert", max_length=32),
                     train=TrainConfig(epochs=1, lr=1e-2, batch_size=4, checkpoint_every=0),
                     laplace=LaplaceConfig(batch_size=4))


def test_run_bon_writes_results_and_resumes(cfg: BonConfig, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_bon(cfg, out, log=lambda *_: None)
    for f in ("results.json", "results.md", "bon.png", "k_sweep.png", "config.json"):
        assert (out / f).stat().st_size > 0
    names = [c["name"] for c in res["curves"]]
    assert names[:3] == ["map", "la:std:k=1", "la:var:k=1"]
    assert {"ens:mean", "ens:wco", "ens:uwo:lambda=0.5", "la-ens:var:k=1"} <= set(names)
    # every selection rule shares the n=1 point: the pool mean of gold
    first = {c["name"]: c["gold"][0] for c in res["curves"]}
    assert max(first.values()) - min(first.values()) < 1e-9
    # the two members were trained with different seeds and differ
    s0 = np.load(out / "proxy" / "member_0" / "eval_scores.npz")["mean"]
    s1 = np.load(out / "proxy" / "member_1" / "eval_scores.npz")["mean"]
    assert not np.allclose(s0, s1)
    assert all(np.load(out / "proxy" / f"member_{i}" / "eval_scores.npz")["var"].min() >= 0 for i in (0, 1))
    # a rerun reuses trained members, posteriors and cached scores and gives the same curves
    again = run_bon(cfg, out, log=lambda *_: None)
    assert [c["gold"] for c in again["curves"]] == [c["gold"] for c in res["curves"]]
    assert set(res["k_sweep_gold_at_max_n"]) == {"std", "var"}
    # a posterior that no longer matches its member (weights changed after the fit) is refused, not used
    member = out / "proxy" / "member_0"
    post_dir = member / "model" / POSTERIOR_DIR
    shutil.copytree(post_dir, tmp_path / "kept_posterior")
    model = RewardModel.load(member)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.5)
    model.save(member / "model")
    shutil.copytree(tmp_path / "kept_posterior", post_dir)
    with pytest.raises(DataError, match="differ from the posterior's MAP") as info:
        run_bon(cfg, out, log=lambda *_: None)
    assert str(post_dir) in str(info.value)


def test_reward_model_as_gold_scores_a_pool_without_gold(cfg: BonConfig, tmp_path: Path) -> None:
    gold_run = tmp_path / "gold"
    run_bon(cfg, gold_run, log=lambda *_: None)  # any trained bayesrm model can serve as gold
    bare = toy_gold_pool(12, 6)
    bare.gold = None
    bare.save_jsonl(tmp_path / "bare.jsonl")
    cfg.pool, cfg.gold, cfg.members = str(tmp_path / "bare.jsonl"), str(gold_run / "proxy" / "member_0"), 1
    res = run_bon(cfg, tmp_path / "run2", log=lambda *_: None)
    assert res["pool"]["gold"] == cfg.gold and all(np.isfinite(c["gold"]).all() for c in res["curves"])
    cfg.gold = "pool"
    with pytest.raises(ValueError, match="no gold rewards"):
        run_bon(cfg, tmp_path / "run3", log=lambda *_: None)


def test_load_config_reports_unknown_fields(tmp_path: Path) -> None:
    good = tmp_path / "c.toml"
    good.write_text('pool = "x.jsonl"\nmembers = 3\n[train]\nlr = 0.001\n[laplace]\nkfac = "expand"\n')
    cfg = load_config(good)
    assert cfg.members == 3 and cfg.train.lr == 0.001 and cfg.laplace.kfac == "expand"
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match=r"b.json.train: unknown field\(s\) \['learning_rate'\]"):
        load_config(bad)
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"methods": ["la:median:k=1"]}))
    with pytest.raises(ValueError):
        load_config(spec)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("bon_*.toml")))
def test_shipped_configs_parse_and_keep_the_laplace_defaults(name: str) -> None:
    """The shipped BoN configs use the library's Laplace defaults (bon_alpaca.toml used to override kfac='reduce',
    the variant the project's own comparison ranks below 'pair')."""
    from bayesrm.config import LaplaceConfig

    if "pool_dir" in (CONFIGS / name).read_text():  # the one-policy overoptimisation pipeline (bayesrm overopt)
        from bayesrm.overopt import load_config as load_overopt

        laplace = load_overopt(CONFIGS / name).proxy.laplace
    else:
        laplace = load_config(CONFIGS / name).laplace
    default = LaplaceConfig()
    assert (laplace.kfac, laplace.tau_method) == (default.kfac, default.tau_method)


def test_cached_scores_are_recomputed_for_other_candidates(tmp_path: Path) -> None:
    """Before: eval_scores.npz was reused whatever the candidates, so `--set eval_prompts=…` on a finished run
    paired old scores with new candidates."""
    import numpy as np

    from bayesrm.experiment import _cached_scores

    calls = []

    def compute(n: int) -> dict[str, np.ndarray]:
        calls.append(n)
        return {"mean": np.arange(n, dtype=float), "var": np.ones(n)}

    path = tmp_path / "eval_scores.npz"
    first = _cached_scores(path, lambda: compute(2), ["p", "p"], ["a", "b"])
    again = _cached_scores(path, lambda: compute(2), ["p", "p"], ["a", "b"])
    other = _cached_scores(path, lambda: compute(2), ["p", "p"], ["a", "c"])
    assert calls == [2, 2] and set(again) == {"mean", "var"}
    assert np.array_equal(first["mean"], again["mean"]) and np.array_equal(other["mean"], [0.0, 1.0])


def test_rerun_says_resuming_and_refits_when_laplace_settings_change(cfg: BonConfig, tmp_path: Path) -> None:
    """Before: a rerun said nothing about what it reused, and one with other laplace settings (now one `--set`
    away) silently kept the old posterior and its cached scores."""
    cfg.members = 1
    out, logs = tmp_path / "run", []
    run_bon(cfg, out, log=logs.append)
    assert logs[0] == f"starting fresh: no checkpoint in {out}"
    logs.clear()
    run_bon(cfg, out, log=logs.append)
    assert logs[0].startswith(f"resuming from {out}") and not any("refitting" in line for line in logs)
    cfg.laplace = LaplaceConfig(batch_size=4, tau_method="mackay")
    logs.clear()
    run_bon(cfg, out, log=logs.append)
    assert any("fitted with other laplace settings; refitting" in line for line in logs)
    post = out / "proxy" / "member_0" / "model" / POSTERIOR_DIR / "posterior.json"
    assert json.loads(post.read_text())["config"]["tau_method"] == "mackay"


def test_a_missing_gold_model_fails_before_the_pool_loads(cfg: BonConfig, tmp_path: Path) -> None:
    cfg.pool, cfg.gold = str(tmp_path / "no_pool.jsonl"), str(tmp_path / "no_gold")
    with pytest.raises(ValueError, match=r"gold reward model .*not a bayesrm model directory"):
        run_bon(cfg, tmp_path / "run", log=lambda *_: None)
