"""Candidate pools and gold labelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bayesrm.data import DataError
from bayesrm.gold import label_pairs_from_gold
from bayesrm.pool import Pool, alpaca_eval_pool, load_pool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def toy_pool(n_prompts: int = 10, n: int = 6) -> Pool:
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    responses = [[f"answer {j} to {i}" for j in range(n)] for i in range(n_prompts)]
    gold = [[float(j) for j in range(n)] for _ in range(n_prompts)]
    return Pool(prompts, responses, gold, [[f"m{j}" for j in range(n)] for _ in range(n_prompts)])


def test_flat_unflatten_and_subset_round_trip() -> None:
    pool = toy_pool(3, 4)
    ps, rs = pool.flat()
    assert len(ps) == len(rs) == 12 and ps[4] == "prompt 1" and rs[4] == "answer 0 to 1"
    assert pool.unflatten(range(12)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    sub = pool.subset([2, 0])
    assert sub.prompts == ["prompt 2", "prompt 0"] and sub.gold is not None and sub.gold[1] == pool.gold[0]  # type: ignore[index]


def test_pool_jsonl_round_trip(tmp_path: Path) -> None:
    pool = toy_pool(3, 4)
    pool.save_jsonl(tmp_path / "pool.jsonl")
    back = load_pool(tmp_path / "pool.jsonl")
    assert back.prompts == pool.prompts and back.responses == pool.responses and back.gold == pool.gold


def test_load_pool_names_bad_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "p", "response": "r", "gold": "high"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'gold'"):
        load_pool(f)


def test_label_pairs_from_gold_orders_by_gold_and_flips_exactly() -> None:
    pool = toy_pool(10, 6)
    clean = label_pairs_from_gold(pool, 5, noise=0.0, seed=1)
    assert len(clean) == 50
    rank = {f"answer {j} to {i}": j for i in range(10) for j in range(6)}
    assert all(rank[p.chosen] > rank[p.rejected] for p in clean)
    noisy = label_pairs_from_gold(pool, 5, noise=0.2, seed=1)
    flipped = [p for p in noisy if p.meta["flipped"]]
    assert len(flipped) == 10
    assert all(rank[p.chosen] < rank[p.rejected] for p in flipped)
    assert label_pairs_from_gold(pool, 5, noise=0.2, seed=1) == noisy  # seeded
    with pytest.raises(ValueError, match="label noise"):
        label_pairs_from_gold(pool, 5, noise=0.7)


def test_randomize_noise_is_about_rho() -> None:
    pool = toy_pool(200, 6)
    noisy = label_pairs_from_gold(pool, 5, noise=0.25, noise_mode="randomize", seed=3)
    frac = sum(p.meta["flipped"] for p in noisy) / len(noisy)
    assert 0.21 < frac < 0.29


@pytest.mark.skipif(not (DATA / "alpaca_eval" / "annotations.jsonl.gz").exists(), reason="shared data not present")
def test_alpaca_eval_pool_gold_is_judge_probability() -> None:
    pool = alpaca_eval_pool(DATA)
    assert len(pool) == 805
    assert pool.gold is not None and pool.generators is not None
    sizes = pool.sizes()
    assert min(sizes) >= 50 and max(sizes) <= 58
    flat = [g for row in pool.gold for g in row]
    assert min(flat) >= 0.0 and max(flat) <= 1.0
    # the reference model judged against itself sits at 0.5 (a draw)
    i = pool.generators[0].index("gpt4_1106_preview")
    assert abs(pool.gold[0][i] - 0.5) < 0.05
    # the adversarial constant-output "null model" is dropped by default; kept, the judge rates it far above the pool
    assert not any("example" in g for g in pool.generators)
    raw = alpaca_eval_pool(DATA, exclude_generators=())
    null = [g for gens, golds in zip(raw.generators or [], raw.gold or [], strict=True)
            for name, g in zip(gens, golds, strict=True) if name == "example"]
    assert len(null) > 700 and sum(null) / len(null) > 0.7 > 3 * sum(flat) / len(flat)
