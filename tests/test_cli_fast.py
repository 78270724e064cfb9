"""`bayesrm heads` and `bayesrm select` end to end on a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import toy_pairs
from typer.testing import CliRunner

from bayesrm.active import bald_bt, pair_moments
from bayesrm.cli import app
from bayesrm.data import save_pairs
from bayesrm.feature_heads import load_heads, predict_pairs
from bayesrm.features import pair_features
from bayesrm.model import RewardModel, RMConfig

runner = CliRunner()


def test_heads_then_select(tiny_dir: dict[str, str], tmp_path: Path) -> None:
    data, pool = tmp_path / "train.jsonl", tmp_path / "pool.jsonl"
    save_pairs(toy_pairs(24), data)
    save_pairs(toy_pairs(10, seed=5), pool)
    cache, out = tmp_path / "cache", tmp_path / "heads"
    common = ["--backbone", tiny_dir["bert"], "--max-length", "64", "--cache-dir", str(cache)]
    res = runner.invoke(app, ["heads", str(data), "--out", str(out), "--epochs", "20", *common])
    assert res.exit_code == 0, res.output
    stack, meta, post = load_heads(out)
    assert post is not None and "bayes_nll" in meta["eval"] and (out / "data" / "train.jsonl").exists()
    sel = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["select", str(out), str(pool), "--k", "3", "--by", "bald", "--out", str(sel),
                              "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in sel.read_text().splitlines()]
    # the oracle: BALD of every pool pair from the saved heads, recomputed here, and its top 3
    pairs = toy_pairs(10, seed=5)
    mu, var = predict_pairs(stack, pair_features(RewardModel(RMConfig.from_dict(meta["model"])), pairs), post)
    b = bald_bt(mu, var)
    expect = sorted(range(10), key=lambda i: -float(b[i]))[:3]
    assert [r["prompt"] for r in rows] == [pairs[i].prompt for i in expect]
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["bald"] >= rows[1]["bald"] >= rows[2]["bald"]
    torch.testing.assert_close(torch.tensor([r["mu_delta"] for r in rows], dtype=torch.double), mu[expect])
    # ensembles: σ is the members' spread, and --laplace with several members is refused in one line
    res = runner.invoke(app, ["heads", str(data), "--out", str(tmp_path / "ens"), "--members", "4", "--kind", "mlp",
                              "--hidden", "8", "--epochs", "5", "--no-laplace", *common])
    assert res.exit_code == 0, res.output
    _, var_e = pair_moments(tmp_path / "ens", pairs, cache)
    assert float(var_e.min()) > 0
    res = runner.invoke(app, ["heads", str(data), "--out", str(tmp_path / "x"), "--members", "2", *common])
    assert res.exit_code == 2 and "no-laplace" in res.output


def test_select_needs_uncertainty(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    RewardModel(tiny_cfg("bert")).save(tmp_path / "m")
    save_pairs(toy_pairs(4), tmp_path / "pool.jsonl")
    res = runner.invoke(app, ["select", str(tmp_path / "m"), str(tmp_path / "pool.jsonl"), "--k", "2"])
    assert res.exit_code == 2 and "no Laplace posterior" in " ".join(res.output.split())


def test_train_freeze_backbone_uses_the_feature_cache(tiny_dir: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    save_pairs(toy_pairs(20), data)
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["train", str(data), "--out", str(out), "--backbone", tiny_dir["bert"], "--max-length", "64",
            "--freeze-backbone", "--feature-cache", str(cache), "--epochs", "2", "--lr", "0.05"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "cached features" in res.output and len(list(cache.glob("*.safetensors"))) == 2  # train + eval split
    res = runner.invoke(app, ["laplace", str(out), str(out / "data" / "train.jsonl"), "--subset", "head"])
    assert res.exit_code == 0, res.output  # an ordinary model: the rest of the CLI takes it
    res = runner.invoke(app, args)  # a rerun hits the cache
    assert res.exit_code == 0 and res.output.count("cache hit") == 2, res.output
