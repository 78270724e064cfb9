"""Generated pools from a tiny random causal LM: shapes, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bayesrm.model import resolve_backbone
from bayesrm.pool import load_pool
from bayesrm.sample import SampleConfig, sample_pool


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))
    tok.eos_token = "[SEP]"
    tok.save_pretrained(out)
    return str(out)


def test_sample_pool_shards_resume_and_determinism(tiny_lm: str, tmp_path: Path) -> None:
    prompts = [f"tell me about topic {i}" for i in range(5)]
    cfg = SampleConfig(model=tiny_lm, n=3, max_new_tokens=6, shard_size=2, batch_prompts=2, template="plain",
                       backend="transformers", seed=7)
    lines: list[str] = []
    merged = sample_pool(prompts, cfg, tmp_path / "a", log=lines.append)
    rows = [json.loads(x) for x in merged.read_text().splitlines()]
    assert len(rows) == 15 and [r["prompt"] for r in rows[::3]] == prompts
    assert sorted({r["sample"] for r in rows}) == [0, 1, 2]
    assert len(list((tmp_path / "a").glob("shard_*.jsonl"))) == 3
    # deleting one shard and rerunning regenerates exactly that shard
    (tmp_path / "a" / "shard_00001.jsonl").unlink()
    again_path = sample_pool(prompts, cfg, tmp_path / "a", log=lines.append)
    again = [json.loads(x) for x in again_path.read_text().splitlines()]
    assert again == rows
    assert lines == [f"starting fresh: no finished shards in {tmp_path / 'a'}",
                     f"resuming from {tmp_path / 'a'}: 2 of 3 shards done"]
    # a fresh run with the same seed draws the same samples; the pool loads for best-of-n
    fresh = [json.loads(x) for x in sample_pool(prompts, cfg, tmp_path / "b").read_text().splitlines()]
    assert fresh == rows
    pool = load_pool(merged, min_size=1)
    assert pool.prompts == prompts and pool.sizes() == [3] * 5
