"""The issue-14 pipeline: split, gold pairs, score cache, report maths, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesrm.overopt import (
    STAGES,
    GenerationConfig,
    GoldConfig,
    OveroptConfig,
    ProxyConfig,
    ReportConfig,
    gold_training_pairs,
    load_part,
    split_instructions,
)
from bayesrm.overopt_report import selection, sigma_mechanism
from bayesrm.train import TrainConfig

N_PROMPTS = 14


def _annotations(root: Path) -> Path:
    """A fake AlpacaEval judge file: 14 prompts × 5 models (+ the null model), preferences spread over [1, 2]."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(N_PROMPTS):
        prompt = f"instruction number {i}: explain item {i}" + (" at length" * 60 if i == 0 else "")
        for j in range(5):
            rows.append({"instruction": prompt, "output_1": f"reference answer {i}", "generator_1": "ref",
                         "output_2": f"model {j} says {'good ' * j}things about {i}", "generator_2": f"m{j}",
                         "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": float(1 + rng.uniform())})
        rows.append({"instruction": prompt, "output_1": "ref", "generator_1": "ref", "output_2": "null exploit",
                     "generator_2": "example", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 2.0})
        rows.append({"instruction": prompt, "output_1": "ref", "generator_1": "ref", "output_2": "",  # as in the data
                     "generator_2": "empty", "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": 1.0})
    path = root / "alpaca_eval" / "annotations.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def test_split_is_prompt_disjoint_seeded_and_length_filtered() -> None:
    prompts = [f"p{i}" for i in range(30)] + ["x" * 500]
    cfg = OveroptConfig(eval_prompts=5, val_prompts=3, proxy_prompts=10, max_prompt_chars=100)
    parts = split_instructions(prompts, cfg)
    assert [len(parts[k]) for k in ("eval", "val", "proxy_train", "gold_train")] == [5, 3, 10, 13]
    assert len(set().union(*map(set, parts.values()))) == 31  # disjoint and complete
    assert "x" * 500 in parts["gold_train"]  # long prompts only train the gold
    assert split_instructions(prompts, cfg) == parts
    assert split_instructions(prompts, replace(cfg, seed=1))["eval"] != parts["eval"]
    with pytest.raises(ValueError, match="characters"):
        split_instructions(prompts, replace(cfg, proxy_prompts=40))


def test_gold_pairs_are_clean_judged_and_exclude_the_null_model(tmp_path: Path) -> None:
    data = _annotations(tmp_path)
    prompts = {f"instruction number {i}: explain item {i}" for i in range(1, 6)}
    cfg = OveroptConfig(data_dir=str(data), gold=GoldConfig(pairs=10_000, min_confidence=0.3, min_gold_gap=0.4))
    pairs = gold_training_pairs(cfg, prompts, seed=0)
    direct = [p for p in pairs if p.source != "judged-derived"]
    derived = [p for p in pairs if p.source == "judged-derived"]
    with gzip.open(data / "alpaca_eval" / "annotations.jsonl.gz", "rt") as f:
        rows = [json.loads(x) for x in f]
    expect = [r for r in rows if r["instruction"] in prompts and r["generator_2"] not in ("example", "empty")
              and abs(r["preference"] - 1.5) >= 0.3]
    assert len(direct) == len(expect) > 0
    assert all(p.prompt in prompts and "null exploit" not in (p.chosen, p.rejected) for p in pairs)
    assert derived and all(p.meta["gold_margin"] >= 0.4 for p in derived)
    # the cap takes direct pairs first
    assert len(gold_training_pairs(replace(cfg, gold=replace(cfg.gold, pairs=3)), prompts, 0)) == 3


def test_sigma_mechanism_oracle() -> None:
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    bad = gold < np.median(gold, axis=1, keepdims=True)
    assert sigma_mechanism(proxy, gold, bad.astype(float)) == 1.0  # σ = "gold below median" separates perfectly
    assert sigma_mechanism(proxy, gold, 1.0 - bad) == 0.0


def test_selection_head_prefix_reads_the_head_variance() -> None:
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    var, var_head = torch.tensor([[4.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 9.0], [1.0, 1.0]])
    assert selection("la:std:k=1", mean, var, var_head).tolist() == [-1.0, 2.0]
    assert selection("head:la:std:k=1", mean, var, var_head).tolist() == [1.0, -1.0]
    assert selection("map", mean, var, var_head).tolist() == [1.0, 2.0]


@pytest.mark.slow
def test_pipeline_end_to_end_on_tiny_models(tmp_path: Path, tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bayesrm.model import resolve_backbone

    torch.manual_seed(0)
    lm = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256)
                     ).save_pretrained(lm)
    tok = AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))
    tok.eos_token = "[SEP]"
    tok.save_pretrained(lm)
    rm = tiny_cfg("bert")
    fast = TrainConfig(epochs=1, batch_size=8, checkpoint_every=0)
    cfg = OveroptConfig(
        data_dir=str(_annotations(tmp_path / "data")), pool_dir=str(tmp_path / "pool"), work_dir=str(tmp_path / "w"),
        eval_prompts=3, val_prompts=2, proxy_prompts=4, max_prompt_chars=100,
        generation=GenerationConfig(policy=str(lm), backend="transformers", max_new_tokens=5, n_proxy=4, n_eval=16,
                                    proxy_batch_prompts=2, proxy_shard_prompts=2, template="plain"),
        gold=GoldConfig(pairs=40, members=1, model=rm, train=fast),
        proxy=ProxyConfig(pairs_per_prompt=4, members=2, model=rm, train=fast),
        eval=ReportConfig(n_boot=50, min_prompts=3, results_dir=str(tmp_path / "results"), score_batch_size=16))
    for stage in ("generate", "gold", "label", "proxy", "score", "report"):
        STAGES[stage](cfg, log=lambda _: None)
    pool = load_part(cfg, "eval")
    assert len(pool) == 3 and pool.sizes() == [16] * 3
    assert len(list((tmp_path / "pool" / "proxy_train").glob("shard_*.parquet"))) == 2
    labelled = [json.loads(x) for x in (tmp_path / "w" / "data" / "proxy_train_pairs.jsonl").read_text().splitlines()]
    assert len(labelled) == 16 and sum(p["meta"]["flipped"] for p in labelled) == 4  # 25% of 4 prompts × 4 pairs
    r = json.loads((tmp_path / "results" / "results.json").read_text())
    assert r["ns"] == [1, 2, 4] and r["n_prompts"] == 3
    gold = pq_column(tmp_path / "pool" / "scores" / "eval" / "gold")
    n1 = {m: v["gold_at_max_n"] for m, v in r["methods"].items()}
    assert set(n1) >= {"map", "la:var:k=1", "head:la:std:k=1", "ens:wco", "la-ens:var:k=1"}
    for c in r["curves"]:  # best-of-1 is the pool mean for every selection rule (exact)
        assert c["gold"][0] == pytest.approx(gold.mean(), abs=1e-5)
    assert r["methods"]["map"]["diff_vs_map_at_max_n"] == 0.0
    assert (tmp_path / "results" / "bon.png").exists() and (tmp_path / "results" / "mechanism.png").exists()
    # a rerun recomputes nothing: the score cache is read, not rewritten
    cache = sorted((tmp_path / "pool" / "scores").rglob("shard_*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    monkeypatch.setattr("bayesrm.overopt.RewardModel.score", lambda *a, **k: pytest.fail("rescored"))
    STAGES["score"](cfg, log=lambda _: None)
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    # eval.max_prompts: the report (and score) read only the first prompts, from the same cache
    first2 = replace(cfg, eval=replace(cfg.eval, min_prompts=2, max_prompts=2, results_dir=str(tmp_path / "r2")))
    r2 = STAGES["report"](first2, log=lambda _: None)
    assert r2["n_prompts"] == 2 and [p.stat().st_mtime_ns for p in cache] == stamps  # type: ignore[index]
    assert r2["curves"][0]["gold"][0] == pytest.approx(gold[:32].mean(), abs=1e-5)  # type: ignore[index]
    with pytest.raises(ValueError, match=r"below eval\.min_prompts"):
        replace(cfg, eval=replace(cfg.eval, max_prompts=2))


def pq_column(folder: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.concatenate([pq.read_table(p).column("gold").to_numpy() for p in sorted(folder.glob("shard_*"))])


def test_sigma_mechanism_is_null_without_both_kinds() -> None:
    proxy = np.arange(20.0)[None]
    assert sigma_mechanism(proxy, proxy.copy(), proxy.copy()) is None  # the top decile is all above the median


def test_config_file_loads_and_bad_fields_fail_with_their_name(tmp_path: Path) -> None:
    from bayesrm.overopt import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "bon_smollm.toml", ["generation.n_eval=2048"])
    assert cfg.generation.n_eval == 2048 and cfg.generation.backend == "ctranslate2" and cfg.eval_prompts == 64
    bad = tmp_path / "bad.toml"
    bad.write_text("[generation]\nfoo = 1\n")
    with pytest.raises(ValueError, match="foo"):
        load_config(bad)
