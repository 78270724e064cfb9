"""`bayesrm heads` and `bayesrm select` end to end on a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import toy_pairs
from test_serve import running
from typer.testing import CliRunner

from bayesrm.active import bald_bt, pair_moments
from bayesrm.cli import app
from bayesrm.data import save_pairs
from bayesrm.feature_heads import load_heads, predict_pairs
from bayesrm.features import pair_features
from bayesrm.model import RewardModel, RMConfig
from bayesrm.scoring import Scorer
from bayesrm.serve import create_app

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


def test_score_reads_fast_heads(tiny_dir: dict[str, str], tmp_path: Path) -> None:
    """`bayesrm score` on `bayesrm heads` output: rewards, Laplace σ and the ensemble's standardised mean equal an
    oracle built from the saved heads, dense Σ = U diag(1/(λ/T + τ)) Uᵀ and the stored statistics (before: score
    could not read a heads directory at all)."""
    data, inp = tmp_path / "train.jsonl", tmp_path / "responses.jsonl"
    save_pairs(toy_pairs(24), data)
    pairs = toy_pairs(6, seed=3)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    inp.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses,
                                                                                           strict=True)))
    common = ["--backbone", tiny_dir["bert"], "--max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    one, ens = tmp_path / "one", tmp_path / "ens"
    assert runner.invoke(app, ["heads", str(data), "--out", str(one), "--epochs", "20", *common]).exit_code == 0
    res = runner.invoke(app, ["heads", str(data), "--out", str(ens), "--members", "3", "--kind", "mlp", "--hidden",
                              "8", "--epochs", "5", "--no-laplace", *common])
    assert res.exit_code == 0, res.output

    def score(path: Path, spec: str) -> list[dict[str, float]]:
        out = tmp_path / f"{path.name}_{spec.replace(':', '_')}.jsonl"
        res = runner.invoke(app, ["score", str(path), str(inp), "--spec", spec, "--out", str(out)])
        assert res.exit_code == 0, res.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    stack, meta, post = load_heads(one)
    assert post is not None
    model = RewardModel(RMConfig.from_dict(meta["model"]))
    ids = model.encode(prompts, responses)
    with torch.no_grad():
        f = torch.cat([model.features(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids])
    block = post.blocks["head"]
    cov = block.a_vecs @ torch.diag(1 / (block.a_vals / post.cfg.temperature + post.tau["head"])) @ block.a_vecs.T
    want_var = torch.einsum("nd,de,ne->n", f.double(), cov, f.double())
    rows = score(one, "la:std:k=1")
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows], dtype=torch.double),
                               stack(f)[0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["reward_std"] for r in rows], dtype=torch.double) ** 2, want_var,
                               rtol=1e-4, atol=1e-9)
    assert [r["reward"] for r in score(one, "map")] == [r["reward"] for r in rows]
    with running(create_app(Scorer.load(one, "la:std:k=1"))) as (url, _):  # `bayesrm serve` on the heads
        res = httpx.post(f"{url}/v1/score", json={"prompt": prompts[0], "responses": responses[:1]})
    assert res.status_code == 200, res.text
    assert res.json()["results"][0]["std"] == pytest.approx(rows[0]["reward_std"], rel=1e-5)

    stack_e, meta_e, _ = load_heads(ens)
    stats = meta_e["standardization"]
    z = (stack_e(f).double() - torch.tensor(stats["mean"])[:, None]) / torch.tensor(stats["std"])[:, None]
    rows = score(ens, "ens:mean")
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows], dtype=torch.double), z.mean(0),
                               rtol=1e-3, atol=2e-4)  # fp32 features, batched vs one at a time, over a small std
    torch.testing.assert_close(torch.tensor([r["reward_std"] for r in rows], dtype=torch.double),
                               z.std(0, correction=0), rtol=1e-3, atol=2e-4)

    for path, spec, message in ((one, "ens:mean", "use map or la"), (ens, "la:std:k=1", "use ens:mean")):
        res = runner.invoke(app, ["score", str(path), str(inp), "--spec", spec, "--out", str(tmp_path / "x.jsonl")])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    cfg = json.loads((one / "heads.json").read_text())
    cfg["backbone_sha256"] = "0" * 64  # heads from another backbone's features
    (one / "heads.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["score", str(one), str(inp), "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "other weights" in " ".join(res.output.split()), res.output
