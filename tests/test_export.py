"""`bayesrm export` round trips through plain transformers and peft, and transformers reward models loaded as
RewardModels (scoring and head-only Laplace) on tiny random backbones and the embedded MiniLM."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, toy_pairs
from typer.testing import CliRunner

from bayesrm.cli import app
from bayesrm.export import ADAPTER_DIR, INPUT_FORMAT_KEY, export_model, recipe_ids
from bayesrm.model import RewardModel, RMConfig

LONG = ("why " * 80, "because " * 90 + "the end")  # longer than max_length: truncation keeps the response's end
PROMPTS = ["question 1 about cats", "hi", LONG[0], "a b c"]
RESPONSES = ["good great kind", "bad", LONG[1], "clear and correct answer"]


def _trained_like(cfg: RMConfig, path: Path, seed: int = 0) -> RewardModel:
    """A saved model whose LoRA B and head are random (so the merge and the head both matter)."""
    model = RewardModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or n.startswith("head.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save(path)
    return RewardModel.load(path)


def _readme_rewards(folder: Path, base: str | None = None) -> torch.Tensor:
    """Rewards from running the README's code (plain transformers / peft and the recorded format) per pair."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert code is not None
    src = code.group(1)
    if base is not None:  # the adapter README names the backbone as a user would; point it at the local copy
        src = re.sub(r"^BASE = .*$", f"BASE = {base!r}", src, flags=re.M)
    out = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        ns: dict[str, object] = {"THIS_DIR": str(folder), "prompt": prompt, "response": response}
        exec(src, ns)  # the documented recipe, run as a user would
        out.append(float(ns["reward"]))  # type: ignore[arg-type]
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_merged_and_adapter_give_the_same_rewards(kind: str, tiny_cfg: Callable[..., RMConfig],
                                                         tiny_dir: dict[str, str], tmp_path: Path) -> None:
    model = _trained_like(tiny_cfg(kind, max_length=40), tmp_path / "run")
    ref = model.score(PROMPTS, RESPONSES)
    assert len(model.encode([LONG[0]], [LONG[1]])[0]) == 40  # the long probe is truncated
    info = export_model(tmp_path / "run", tmp_path / "out")
    assert info["merged_max_abs_error"] < 1e-5 and info["adapter_max_abs_error"] < 1e-5
    assert torch.allclose(_readme_rewards(tmp_path / "out"), ref, atol=1e-5)
    assert torch.allclose(_readme_rewards(tmp_path / "out" / ADAPTER_DIR, tiny_dir[kind]), ref, atol=1e-5)
    adapter_cfg = json.loads((tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert set(adapter_cfg["modules_to_save"]) == ({"classifier", "pooler"} if kind == "bert" else {"score"})
    # the export loads back into bayesrm as a transformers reward model with the same rewards
    assert torch.allclose(RewardModel.load(tmp_path / "out").score(PROMPTS, RESPONSES), ref, atol=1e-5)


def test_export_of_the_embedded_minilm(tmp_path: Path) -> None:
    model = _trained_like(RMConfig(max_length=48), tmp_path / "run", seed=1)
    ref = model.score(PROMPTS, RESPONSES)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert torch.allclose(_readme_rewards(tmp_path / "out"), ref, atol=1e-5)
    fmt = json.loads((tmp_path / "out" / "config.json").read_text())[INPUT_FORMAT_KEY]
    assert fmt["prefix"] + fmt["response"] == "<|prompter|>{prompt}<|endoftext|><|assistant|>{response}<|endoftext|>"
    # the recipe is bayesrm's tokenisation, truncation included
    tok = model.tokenizer
    assert [recipe_ids(tok, fmt, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)] == model.encode(
        PROMPTS, RESPONSES)


def _save_seq_cls(kind: str, root: Path) -> Path:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from bayesrm.model import resolve_backbone

    torch.manual_seed(1)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=128, num_labels=1))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=128, num_labels=1, pad_token_id=0))
    out = root / f"{kind}_rm"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2")).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_transformers_reward_model_scores_as_transformers_does(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _save_seq_cls(kind, tmp_path)
    rm = RewardModel.load(path)
    assert rm.config.seq_cls and rm.config.template == "plain" and not rm.lora_parameters()
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [f"{p}\n\n{r}" for p, r in zip(PROMPTS[:2] + PROMPTS[3:], RESPONSES[:2] + RESPONSES[3:], strict=True)]
    with torch.no_grad():
        ref = hf(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0]
    got = rm.score(PROMPTS[:2] + PROMPTS[3:], RESPONSES[:2] + RESPONSES[3:], batch_size=2)  # padded batches
    assert torch.allclose(got, ref, atol=1e-5)


def test_laplace_on_a_transformers_reward_model_in_one_command(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from bayesrm.laplace import LaplacePosterior
    from bayesrm.scoring import Scorer

    path = _save_seq_cls("bert", tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in toy_pairs(16)))
    res = CliRunner().invoke(app, ["laplace", str(path), str(data)])
    assert res.exit_code == 0, res.output
    post = LaplacePosterior.load(path / "laplace")
    assert post.cfg.subset == "head"
    clf = AutoModelForSequenceClassification.from_pretrained(str(path)).classifier.weight[0].detach()
    assert torch.allclose(next(iter(post.blocks.values())).theta[0].float(), clf, atol=1e-6)  # the bias is out
    s = Scorer.load(path, "la:std:k=1").score(["q"], ["a good answer"])
    assert s.std is not None and float(s.std[0]) > 0



def test_export_check_catches_a_head_that_does_not_reproduce_the_rewards(
        tiny_cfg: Callable[..., RMConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bayesrm.export as ex

    _trained_like(tiny_cfg("bert", max_length=40), tmp_path / "run")
    monkeypatch.setattr(ex, "TANH_SCALE", 1.0)  # tanh no longer in its linear range: the logits bend
    with pytest.raises(ValueError, match="export aborted"):
        export_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_head_laplace_of_an_export_is_the_original_models(kind: str, tiny_cfg: Callable[..., RMConfig],
                                                          tmp_path: Path) -> None:
    from bayesrm.config import LaplaceConfig
    from bayesrm.laplace import fit_laplace

    original = _trained_like(tiny_cfg(kind, max_length=40), tmp_path / "run")
    export_model(tmp_path / "run", tmp_path / "out")
    imported = RewardModel.load(tmp_path / "out")  # features and head read back, not the rescaled w/s
    assert torch.allclose(imported.head.weight, original.head.weight, atol=1e-6)
    pairs, test = toy_pairs(12), toy_pairs(5, seed=7)
    cfg = LaplaceConfig(subset="head", prior_mean="zero", batch_size=4)
    posts = [fit_laplace(m, pairs, cfg) for m in (original, imported)]
    assert posts[0].tau == pytest.approx(posts[1].tau, rel=1e-4)
    (mu0, v0), (mu1, v1) = (p.predict_pairs(m, test) for p, m in zip(posts, (original, imported), strict=True))
    assert torch.allclose(mu0, mu1, atol=1e-5) and torch.allclose(v0, v1, rtol=1e-3, atol=1e-8)
