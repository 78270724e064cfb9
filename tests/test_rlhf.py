"""RLHF experiment: config loading, prompt selection, summaries, and a real tiny GRPO run end to end (CLI + resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bayesrm.cli import app
from bayesrm.model import resolve_backbone
from bayesrm.rlhf import (
    PolicyConfig,
    RLHFConfig,
    add_prompt_deltas,
    final_summary,
    load_config,
    policy_path,
    run_rlhf,
    select_prompts,
    step_history,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["rlhf_cpu.toml", "rlhf_gpu.toml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert "map" in cfg.runs and any(s.startswith("la:") for s in cfg.runs.values())
    assert cfg.policy.model == "smollm2" and cfg.beta > 0  # β > 0: TRL computes and logs the KL


@pytest.mark.parametrize(("body", "match"), [
    ("steps = 3\nbogus = 1\n", "unknown field"),
    ("[runs]\nla = \"la:cube:k=1\"\n", "unknown rule"),
    ("[runs]\nla = \"la:var:k=1+logsig\"\n", "reference"),
    ("algorithm = \"ppo\"\n", "ppo"),
    ("prompts_per_step = 3\nnum_generations = 4\nmicro_batch = 8\n", "micro_batch"),
    ("[policy]\nlora_rank = 8\n", r"policy.*unknown field"),
])
def test_config_errors(tmp_path: Path, body: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_config(f)


def _write_prompts(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": f"question {i} about cats", "output": "x"} for i in range(12)]
    rows += [{"instruction": "question 0 about cats"}, {"instruction": "y" * 500}]  # a duplicate, a long one
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    excl = tmp_path / "train.jsonl"
    excl.write_text(json.dumps({"prompt": "question 1 about cats", "chosen": "a", "rejected": "b"}) + "\n")
    return prompts, excl


def test_select_prompts_holds_out_and_is_seeded(tmp_path: Path) -> None:
    prompts, excl = _write_prompts(tmp_path)
    cfg = RLHFConfig(prompts=str(prompts), exclude=[str(excl)], n_prompts=11, max_prompt_chars=100)
    got = select_prompts(cfg)
    assert len(got) == len(set(got)) == 11 and "question 1 about cats" not in got and all(len(p) < 100 for p in got)
    assert got == select_prompts(cfg) and got != select_prompts(RLHFConfig(**{**cfg.__dict__, "seed": 1}))
    with pytest.raises(ValueError, match="only 11 usable"):
        select_prompts(RLHFConfig(prompts=str(prompts), exclude=[str(excl)], n_prompts=12, max_prompt_chars=100))


def test_step_history_and_summary() -> None:
    log: list[dict[str, Any]] = [{"step": s, "rewards/proxy/mean": 0.1 * s - 1, "proxy_reward": 0.1 * s, "gold": -s,
                                  "sigma": 0.5, "kl": 0.01 * s, "completions/mean_length": 10.0} for s in (1, 2, 3)]
    log.append({"step": 3, "train_runtime": 1.0})  # the final summary entry has no gold
    h = step_history(log)
    assert [r["step"] for r in h] == [1, 2, 3]
    assert h[2]["kl_seq"] == pytest.approx(0.3) and h[0]["proxy"] == pytest.approx(-0.9)
    f = final_summary(h, window=2)
    assert f["gold_start"] == -1 and f["gold_end"] == pytest.approx(-2.5) and f["kl_seq_end"] == pytest.approx(0.25)


def test_prompt_deltas_centre_each_prompt_on_its_first_pass(tmp_path: Path) -> None:
    rows = [{"step": st, "prompt": p, "gold": g, "reward": r} for st, p, g, r in [
        (1, "a", 1.0, 0.0), (1, "a", 3.0, 0.0), (2, "b", -5.0, 1.0), (3, "a", 2.5, 0.5), (3, "b", -4.0, 1.0),
        (4, "new", 9.0, 9.0)]]  # "new" has no first-pass baseline: skipped
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = add_prompt_deltas([{"step": s} for s in (1, 2, 3, 4)], f, first_pass=2)
    assert [x["gold_delta"] for x in h[:3]] == pytest.approx([0.0, 0.0, 0.75])  # (0.5 + 1.0) / 2 at step 3
    assert h[2]["proxy_delta"] == pytest.approx(0.25) and h[3]["gold_delta"] != h[3]["gold_delta"]  # NaN


def test_policy_path_passes_plain_models_through(tmp_path: Path) -> None:
    assert policy_path(PolicyConfig(model=str(tmp_path))) == str(tmp_path)


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM saved with the MiniLM tokenizer and a toy chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("policy")
    tok = AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"),
                                        model_input_names=["input_ids", "attention_mask"])  # no token_type_ids
    tok.eos_token = tok.sep_token
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                 max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_rlhf_cli_runs_logs_gold_and_resumes(tiny_policy_dir: Path, laplace_ensemble: Path, tmp_path: Path) -> None:
    prompts, excl = _write_prompts(tmp_path)
    cfg = {"proxy": str(laplace_ensemble / "member_0"), "gold": str(laplace_ensemble / "member_1"),
           "runs": {"map": "map", "la": "la:var:k=1"}, "algorithm": "grpo", "prompts": str(prompts),
           "exclude": [str(excl)], "n_prompts": 6, "steps": 1, "prompts_per_step": 2, "num_generations": 2,
           "max_completion_length": 4, "lr": 1e-2, "beta": 0.1, "micro_batch": 2, "save_every": 1,
           "score_batch_size": 8, "policy": {"model": str(tiny_policy_dir), "lora_r": 2, "lora_alpha": 4,
                                              "lora_layers": 1}}
    cfg_file = tmp_path / "rlhf.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "rlhf"
    res = CliRunner().invoke(app, ["rlhf", str(cfg_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "gold start" in res.output
    for f in ("results.json", "results.md", "rlhf.png", "config.json"):
        assert (out / f).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    la, mp = (results["runs"][n]["history"] for n in ("la", "map"))
    assert [h["step"] for h in la] == [1] and [h["step"] for h in mp] == [1]
    for h in la:
        assert h["sigma"] > 0 and h["proxy"] < h["proxy_reward"]  # trained on r − σ², logged r
        assert h["gold_delta"] == pytest.approx(0.0, abs=1e-9)  # step 1 is its own first-pass baseline
    assert all(h["proxy"] == pytest.approx(h["proxy_reward"], abs=1e-5) and h["sigma"] > 0 for h in mp)
    rows = [json.loads(x) for x in (out / "la" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4  # 2 prompts × 2 generations per step
    assert {"prompt", "completion", "gold", "sigma", "proxy", "reward"} <= set(rows[0])
    assert rows[0]["prompt"].startswith("question") and "question 1 about cats" not in {r["prompt"] for r in rows}

    # a finished run is reused; a longer run resumes from its last checkpoint and keeps the earlier rows
    (out / "la" / "done.json").unlink()
    logs: list[str] = []
    longer = load_config(cfg_file)
    longer.steps = 2
    again = run_rlhf(longer, out, log=logs.append)
    assert any("resuming from" in m and "checkpoint-1" in m for m in logs)
    assert [h["step"] for h in again["runs"]["la"]["history"]] == [1, 2]
    assert [h["step"] for h in again["runs"]["map"]["history"]] == [1]  # done: not retrained
    rows = [json.loads(x) for x in (out / "la" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4
    res = CliRunner().invoke(app, ["rlhf", str(cfg_file), "--out", str(out), "--only", "nope"])
    assert res.exit_code == 2 and "unknown run" in res.output


def test_rloo_run(tiny_policy_dir: Path, laplace_ensemble: Path, tmp_path: Path) -> None:
    prompts, excl = _write_prompts(tmp_path)
    cfg = RLHFConfig(proxy=str(laplace_ensemble / "member_0"), gold=str(laplace_ensemble / "member_1"),
                     runs={"la": "la:std:k=1"}, algorithm="rloo", prompts=str(prompts), exclude=[str(excl)],
                     n_prompts=4, steps=1, prompts_per_step=2, num_generations=2, max_completion_length=4,
                     micro_batch=4, save_every=1, policy=PolicyConfig(model=str(tiny_policy_dir), lora_r=2,
                                                                      lora_alpha=4))
    (h,) = run_rlhf(cfg, tmp_path / "out", log=lambda _: None)["runs"]["la"]["history"]
    assert h["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples the initial policy = the reference
    assert h["sigma"] > 0 and h["proxy"] < h["proxy_reward"]
    assert (tmp_path / "out" / "la" / "final" / "adapter_model.safetensors").exists()
