"""Tiny random backbones built from configs (no network), shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps a loaded 2-core machine usable

from bayesrm.data import Pair  # noqa: E402
from bayesrm.model import RMConfig, resolve_backbone  # noqa: E402

VOCAB = 30522  # the embedded MiniLM WordPiece tokenizer is reused by the tiny models


def _save_tiny(kind: str, root: Path) -> str:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        GPTNeoXConfig,
        GPTNeoXModel,
        LlamaConfig,
        LlamaModel,
    )

    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=128), add_pooling_layer=False)
    elif kind == "neox":
        model = GPTNeoXModel(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=128))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128))
    out = root / kind
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2")).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("backbones")
    return {k: _save_tiny(k, root) for k in ("bert", "neox", "llama")}


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dir: dict[str, str]):  # type: ignore[no-untyped-def]
    def make(kind: str = "bert", **kw: object) -> RMConfig:
        base = {"backbone": tiny_dir[kind], "max_length": 64, "lora_r": 2, "lora_alpha": 4} | kw
        return RMConfig(**base)  # type: ignore[arg-type]
    return make


WORDS = "good bad great awful helpful rude clear vague kind harsh correct wrong short long".split()  # noqa: SIM905


def toy_pairs(n: int = 24, seed: int = 0) -> list[Pair]:
    """A learnable toy preference: responses with 'good'-type words beat 'bad'-type words."""
    import random

    rng = random.Random(seed)
    pos, neg = WORDS[0::2], WORDS[1::2]
    out = []
    for i in range(n):
        prompt = f"question {i % max(n // 2, 1)} about " + rng.choice(["cats", "dogs", "maths", "code"])
        c = " ".join(rng.choice(pos) for _ in range(rng.randint(2, 8)))
        r = " ".join(rng.choice(neg) for _ in range(rng.randint(2, 8)))
        out.append(Pair(prompt, c, r, id=str(i)))
    return out


@pytest.fixture
def pairs() -> list[Pair]:
    return toy_pairs()


@pytest.fixture(scope="session")
def laplace_ensemble(tiny_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A trained 2-member tiny-bert ensemble dir; member_i holds a model and its Laplace posterior (member_i/laplace).

    member_0 alone is an ordinary trained run directory (for anything that needs one model with a posterior).
    """
    from bayesrm.ensemble import train_ensemble
    from bayesrm.laplace import LaplaceConfig, fit_laplace
    from bayesrm.model import RewardModel
    from bayesrm.run import POSTERIOR_DIR
    from bayesrm.train import TrainConfig

    out = tmp_path_factory.mktemp("laplace_ens")
    data = toy_pairs(16)
    train_ensemble(tiny_cfg("bert"), TrainConfig(max_steps=4, batch_size=4, lr=1e-2, checkpoint_every=0), data, out,
                   members=2, show_progress=False)
    for i in range(2):
        member = out / f"member_{i}"
        fit_laplace(RewardModel.load(member), data, LaplaceConfig(batch_size=8)).save(member / POSTERIOR_DIR)
    return out
