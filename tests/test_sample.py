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
    tok.bos_token = "[CLS]"  # CTranslate2 needs both in its model config
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
    assert [x for x in lines if not x.startswith("shard ")] == [
        f"starting fresh: no finished shards in {tmp_path / 'a'}",
        f"resuming from {tmp_path / 'a'}: 2 of 3 shards done"]
    assert sum(x.startswith("shard 1 written: 6 samples") for x in lines) == 2  # drawn, deleted, redrawn
    # a fresh run with the same seed draws the same samples; the pool loads for best-of-n
    fresh = [json.loads(x) for x in sample_pool(prompts, cfg, tmp_path / "b").read_text().splitlines()]
    assert fresh == rows
    pool = load_pool(merged, min_size=1)
    assert pool.prompts == prompts and pool.sizes() == [3] * 5


def test_backend_and_format_are_validated() -> None:
    with pytest.raises(ValueError, match="backend"):
        SampleConfig(model="x", backend="llama.cpp")
    with pytest.raises(ValueError, match="fmt"):
        SampleConfig(model="x", fmt="csv")


def test_ctranslate2_parquet_shards_resume_and_seeds(tiny_lm: str, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    import pyarrow.parquet as pq

    from bayesrm.sample import ct2_model, shard_path

    prompts = [f"tell me about topic {i}" for i in range(3)]
    cfg = SampleConfig(model=tiny_lm, n=5, max_new_tokens=7, shard_size=2, batch_prompts=2, max_batch=4,
                       template="plain", backend="ctranslate2", top_p=1.0, seed=3, fmt="parquet")
    out = sample_pool(prompts, cfg, tmp_path / "a")
    assert ct2_model(tiny_lm) == ct2_model(tiny_lm)  # converted once, cached beside the source
    t = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in t] == [p for p in prompts for _ in range(5)]
    assert [r["sample"] for r in t] == list(range(5)) * 3
    assert all(0 <= r["n_tokens"] <= 7 for r in t) and any(r["n_tokens"] == 7 for r in t)
    # a random LM over a 30k vocabulary: i.i.d. samples of one prompt differ
    assert len({r["response"] for r in t[:5]}) == 5
    # rerun regenerates a deleted shard identically; another seed draws other samples
    first = pq.read_table(shard_path(out, 1, "parquet")).to_pylist()
    shard_path(out, 1, "parquet").unlink()
    sample_pool(prompts, cfg, tmp_path / "a")
    assert pq.read_table(shard_path(out, 1, "parquet")).to_pylist() == first
    other = sample_pool(prompts, SampleConfig(**{**cfg.__dict__, "seed": 4}), tmp_path / "b")
    assert pq.read_table(other).column("response").to_pylist() != [r["response"] for r in t]


def test_shard_loop_skips_finished_shards_with_fake_generator(tmp_path: Path) -> None:
    calls: list[tuple[list[str], int]] = []

    def fake(prefixes: list[str], seed: int) -> list[tuple[list[str], list[int]]]:
        calls.append((list(prefixes), seed))
        return [([f"{p}|{seed}|{j}" for j in range(2)], [j + 1 for j in range(2)]) for p in prefixes]

    class Tok:
        chat_template = None

    cfg = SampleConfig(model="fake", n=2, shard_size=2, batch_prompts=1, template="plain", seed=10, fmt="parquet")
    prompts = ["a", "b", "c"]
    sample_pool(prompts, cfg, tmp_path, generator=(fake, Tok()))
    assert [s for _, s in calls] == [10, 11, 100_013]  # seed + shard·100003 + batch offset
    calls.clear()
    (tmp_path / "shard_00000.parquet").unlink()
    sample_pool(prompts, cfg, tmp_path, generator=(fake, Tok()))
    assert [s for _, s in calls] == [10, 11]  # only the missing shard is redrawn


def test_transformers_backend_samples_the_full_distribution() -> None:
    """transformers applies a default top-k of 50 unless told otherwise: i.i.d. samples need top_k=0 passed."""
    from bayesrm.sample import _generate_hf

    seen: dict[str, object] = {}

    class Model:
        device = torch.device("cpu")

        def generate(self, **kw: object) -> torch.Tensor:
            seen.update(kw)
            return torch.tensor([[5, 6, 7, 2, 0]] * 2)

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, texts: list[str], **kw: object) -> dict[str, torch.Tensor]:
            class Enc(dict):  # type: ignore[type-arg]
                def to(self, device: object) -> Enc:
                    return self

            return Enc(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2))

    cfg = SampleConfig(model="m", n=2, top_p=1.0, max_new_tokens=3)
    ids = _generate_hf(Model(), Tok(), ["p"], cfg, seed=0)
    assert seen["top_k"] == 0 and seen["top_p"] == 1.0
    assert ids == [[[7], [7]]]  # generated ids stop at the end token
    with pytest.raises(ValueError, match="top_k"):
        SampleConfig(model="m", top_k=1)
