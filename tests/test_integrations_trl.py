"""TRL reward functions: text extraction, Scorer agreement, and real GRPO / RLOO steps with a tiny random policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bayesrm.integrations.trl import RewardFunction, completion_text, conversation_prompt, message_text
from bayesrm.model import resolve_backbone
from bayesrm.scoring import Scorer

PROMPTS = ["question 1 about cats", "question 2 about code"]
COMPLETIONS = ["good great kind helpful", "bad awful rude"]
CONV_PROMPTS = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}] for p in PROMPTS]
CONV_COMPLETIONS = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]


def test_message_and_conversation_text() -> None:
    assert message_text([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]) == "ab"
    assert message_text(None) == ""
    assert conversation_prompt([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]) == "hi"
    multi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    assert conversation_prompt(multi) == "User: hi\n\nAssistant: hello\n\nUser: and?"
    assert completion_text([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]) == "xy"
    assert completion_text("plain") == "plain"
    with pytest.raises(TypeError, match="content"):
        message_text(3)


def test_reward_function_matches_scorer_in_both_formats(laplace_ensemble: Path) -> None:
    member = laplace_ensemble / "member_0"
    rf = RewardFunction.load(member, "la:var:k=1")
    assert rf.__name__ == "bayesrm_la_var_k_1"
    expected = Scorer.load(member, "la:var:k=1").score(PROMPTS, COMPLETIONS)
    logged: dict[str, float] = {}
    extra: dict[str, list[Any]] = {}
    plain = rf(PROMPTS, COMPLETIONS, log_metric=logged.__setitem__, log_extra=extra.__setitem__)
    conv = rf(CONV_PROMPTS, CONV_COMPLETIONS)
    assert isinstance(plain, list) and all(isinstance(x, float) for x in plain)
    torch.testing.assert_close(torch.tensor(plain, dtype=torch.float64), expected.selection.double())
    assert conv == plain  # the system message is dropped, the user turn is the RM prompt
    assert expected.std is not None
    assert logged["bayesrm_la_var_k_1/reward"] == pytest.approx(float(expected.reward.mean()))
    assert logged["bayesrm_la_var_k_1/sigma"] == pytest.approx(float(expected.std.mean()))
    assert extra["bayesrm_la_var_k_1_sigma"] == pytest.approx(expected.std.tolist())


def test_penalised_rewards_differ_from_map_where_sigma_positive(laplace_ensemble: Path) -> None:
    member = laplace_ensemble / "member_0"
    map_rf = RewardFunction.load(member, "map", name="proxy_map")
    la = RewardFunction.load(member, "la:var:k=1")
    r_map, s = map_rf(PROMPTS, COMPLETIONS), la.scores(PROMPTS, COMPLETIONS)
    assert map_rf.__name__ == "proxy_map"
    assert s.std is not None and bool((s.std > 0).all())
    torch.testing.assert_close(s.reward.float(), torch.tensor(r_map))  # linearised Laplace mean = MAP reward
    torch.testing.assert_close(torch.tensor(r_map, dtype=torch.float64) - s.selection.double(), s.std.double() ** 2)


def test_prompt_key_ensemble_and_errors(laplace_ensemble: Path) -> None:
    rf = RewardFunction.load(laplace_ensemble / "member_0", "map", prompt_key="instruction")
    by_key = rf(["<chat markup> x", "<chat markup> y"], COMPLETIONS, instruction=PROMPTS)
    assert by_key == RewardFunction.load(laplace_ensemble / "member_0")(PROMPTS, COMPLETIONS)
    with pytest.raises(KeyError, match="instruction"):
        rf(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="2 prompts for 1"):
        rf(PROMPTS, COMPLETIONS[:1], instruction=PROMPTS)
    ens = RewardFunction.load(laplace_ensemble, "ens:uwo:lambda=0.5")
    assert len(ens(CONV_PROMPTS, CONV_COMPLETIONS)) == 2
    ref = RewardFunction.load(laplace_ensemble / "member_0", "map+clip")
    with pytest.raises(KeyError, match="ref_reward"):
        ref(PROMPTS, COMPLETIONS)
    assert max(ref(PROMPTS, COMPLETIONS, ref_reward=[-1e9, -1e9])) == 0.0  # min(r − r_ref, 0) with r_ref ≪ r


# --------------------------------------------------------------------------- real trainer steps


@pytest.fixture(scope="module")
def tiny_policy() -> tuple[Any, Any]:
    """A random 2-layer LlamaForCausalLM with the MiniLM tokenizer (plus a toy chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))
    tok.eos_token = tok.sep_token
    tok.model_input_names = ["input_ids", "attention_mask"]  # causal LMs reject BERT's token_type_ids
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    return LlamaForCausalLM(cfg), tok


class _Recorder:
    """Wraps a reward function and keeps what the trainer passed and got back."""

    def __init__(self, rf: RewardFunction) -> None:
        self.rf, self.__name__ = rf, rf.__name__
        self.calls: list[tuple[list[Any], list[Any], list[float]]] = []

    def __call__(self, prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
        out = self.rf(prompts, completions, **kw)
        self.calls.append((prompts, completions, out))
        return out


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trainer_steps_with_map_and_laplace_rewards(trainer: str, tiny_policy: tuple[Any, Any],
                                                    laplace_ensemble: Path, tmp_path: Path) -> None:
    import copy

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    model, tok = tiny_policy
    member = laplace_ensemble / "member_0"
    la = _Recorder(RewardFunction.load(member, "la:var:k=1", name="proxy_la"))
    mp = _Recorder(RewardFunction.load(member, "map", name="proxy_map"))
    conversational = trainer == "grpo"  # GRPO on chat prompts, RLOO on plain strings
    rows = [{"prompt": [{"role": "user", "content": f"question {i} about cats"}]} if conversational
            else {"prompt": f"question {i} about cats"} for i in range(8)]
    Trainer, Config = (GRPOTrainer, GRPOConfig) if trainer == "grpo" else (RLOOTrainer, RLOOConfig)
    args = Config(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, beta=0.1, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                  activation_checkpointing=False, save_strategy="no", disable_tqdm=True,
                  reward_weights=[1.0, 0.0])  # train on the penalised reward; MAP is only logged
    t = Trainer(model=copy.deepcopy(model), reward_funcs=[la, mp], args=args, train_dataset=Dataset.from_list(rows),
                processing_class=tok, peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.train()
    assert len(la.calls) == len(mp.calls) == 2  # one generation batch of 4 completions per step
    prompts, completions, r_la = la.calls[0]
    assert isinstance(prompts[0], list if conversational else str)
    assert isinstance(completions[0], list if conversational else str)
    _, _, r_map = mp.calls[0]
    assert len(r_la) == len(r_map) == 4
    s = la.rf.scores(prompts, completions)
    assert s.std is not None and bool((s.std > 0).all())
    assert all(a < b for a, b in zip(r_la, r_map, strict=True))  # r − σ² < r wherever σ > 0
    log = t.state.log_history[0]
    assert log["rewards/proxy_la/mean"] < log["rewards/proxy_map/mean"]
    assert log["reward"] == pytest.approx(log["rewards/proxy_la/mean"], abs=1e-5)  # weight 0: MAP does not train
    assert log["proxy_la/sigma"] > 0 and "kl" in log
    after = dict(t.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)  # the LoRA policy moved
