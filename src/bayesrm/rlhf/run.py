"""One RLHF run (TRL RLOO/GRPO against one selection spec, resumable) and the experiment over all runs."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bayesrm.integrations.trl import RewardFunction
from bayesrm.io import atomic_write_json, atomic_write_text, jsonl_text, nan_to_null
from bayesrm.objectives import Family, parse_spec
from bayesrm.rlhf.config import Algorithm, RLHFConfig, check_inputs, validate
from bayesrm.rlhf.monitor import GoldMonitor
from bayesrm.rlhf.policy import policy_path, select_prompts
from bayesrm.rlhf.report import add_prompt_deltas, final_summary, plot_rlhf, results_table
from bayesrm.scoring import Scorer


def _progress_callback(total: int, description: str) -> Any:
    """A transformers TrainerCallback: progress with the latest gold / proxy / σ / KL (a rich bar on a terminal,
    plain lines with rate and ETA otherwise)."""
    from transformers import TrainerCallback

    from bayesrm.progress import Ticker

    class _Bar(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ticker = Ticker(description + " (steps)", total, completed=state.global_step, every=0.0).__enter__()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if not logs or "gold" not in logs:
                return
            kl = logs.get("kl", float("nan")) * logs.get("completions/mean_length", float("nan"))
            self.ticker.update(state.global_step, info=(
                f"gold {logs['gold']:.3f} proxy {logs.get('proxy_reward', float('nan')):.3f} "
                f"σ {logs.get('sigma', float('nan')):.3f} KL {kl:.2f}"))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ticker.__exit__(None, None, None)

    return _Bar()


def run_one(cfg: RLHFConfig, name: str, out_dir: str | Path, policy: str | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or resume, or reuse) run `name`; return its per-step history (also in out_dir/name/history.jsonl)."""
    out = Path(out_dir) / name
    hist_file = out / "history.jsonl"
    if (out / "done.json").exists():
        log(f"{name}: finished earlier, reusing {out} (delete it to train again)")
        return [json.loads(line) for line in hist_file.read_text().splitlines() if line.strip()]
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    spec = parse_spec(cfg.runs[name])
    score_spec = "la:var:k=0" if cfg.proxy_sigma and spec.family is Family.MAP else spec  # k=0: MAP reward, + σ
    proxy = RewardFunction.load(cfg.proxy, score_spec, device=device, batch_size=cfg.score_batch_size, name="proxy")
    gold = Scorer.load(cfg.gold, "map", device=device, batch_size=cfg.score_batch_size)
    texts = select_prompts(cfg)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    data = Dataset.from_list([{"prompt": [*system, {"role": "user", "content": t}]} for t in texts])
    path = policy or policy_path(cfg.policy, log)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_layers = int(model.config.num_hidden_layers)
    top = cfg.policy.lora_layers
    lora = LoraConfig(r=cfg.policy.lora_r, lora_alpha=cfg.policy.lora_alpha, lora_dropout=cfg.policy.lora_dropout,
                      target_modules=list(cfg.policy.target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=list(range(max(n_layers - top, 0), n_layers)) if top else None)
    batch = cfg.prompts_per_step * cfg.num_generations
    common: dict[str, Any] = dict(
        output_dir=str(out), max_steps=cfg.steps, learning_rate=cfg.lr, beta=cfg.beta,
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=batch // cfg.micro_batch,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2, seed=cfg.seed,
        report_to=[], disable_tqdm=True, use_cpu=not cuda, bf16=cfg.policy.bf16 and cuda,
        activation_checkpointing=False, log_completions=False)
    rows = out / "completions.jsonl"
    monitor = GoldMonitor(proxy, gold, rows)
    trainer: Any
    if Algorithm(cfg.algorithm) is Algorithm.RLOO:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(model=model, reward_funcs=monitor, train_dataset=data, processing_class=tok,
                              peft_config=lora, args=RLOOConfig(**common,
                                                                normalize_advantages=cfg.normalize_advantages))
    else:
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(model=model, reward_funcs=monitor, train_dataset=data, processing_class=tok,
                              peft_config=lora, args=GRPOConfig(**common))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one line per step from our callback instead of raw dicts
    trainer.add_callback(_progress_callback(cfg.steps, f"{name} ({spec})"))
    last = get_last_checkpoint(str(out)) if any(out.glob("checkpoint-*")) else None
    if last is not None:
        log(f"{name}: resuming from {last}")
        _truncate_rows(rows, int(Path(last).name.split("-")[-1]))
    else:
        log(f"{name}: starting fresh: no checkpoint in {out}")
        rows.unlink(missing_ok=True)  # drop rows from an interrupted run without a checkpoint
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / "final"))
    history = step_history(trainer.state.log_history)
    atomic_write_text(hist_file, jsonl_text(hist_file, nan_to_null(history)))  # absent σ / KL: null
    atomic_write_json(out / "done.json", {"spec": str(spec), "seconds": time.time() - t0, "steps": cfg.steps})
    return history


def _truncate_rows(rows: Path, step: int) -> None:
    """Keep completion rows of steps ≤ `step` (those after the checkpoint are regenerated on resume)."""
    if rows.exists():
        keep = [line for line in rows.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(rows, "".join(line + "\n" for line in keep))


def step_history(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step rows from TRL's log history: proxy (trained reward), proxy_reward (mean), σ, gold, KL.

    `kl` is TRL's per-token estimate (RLOO: k1, GRPO: k3); `kl_seq` = kl × mean completion length, the KL of
    whole completions in nats, which the plots use.
    """
    out = []
    for h in log_history:
        if "gold" not in h:
            continue
        length = float(h.get("completions/mean_length", float("nan")))
        kl = float(h.get("kl", float("nan")))
        out.append({"step": int(h["step"]), "proxy": float(h["rewards/proxy/mean"]),
                    "proxy_reward": float(h.get("proxy_reward", h["rewards/proxy/mean"])),
                    "sigma": float(h.get("sigma", float("nan"))), "gold": float(h["gold"]), "kl": kl,
                    "length": length, "kl_seq": kl * length})
    return out






def run_rlhf(cfg: RLHFConfig, out_dir: str | Path, only: Sequence[str] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every run in `cfg.runs` (or those in `only`), then write results.{json,md} and rlhf.png."""
    validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    names = list(only) if only else list(cfg.runs)
    unknown = [n for n in names if n not in cfg.runs]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; config has {sorted(cfg.runs)}")
    check_inputs(cfg, names)  # before the policy conversion and any model load
    policy = policy_path(cfg.policy, log)
    for name in names:
        log(f"run {name}: {cfg.algorithm} on proxy spec '{cfg.runs[name]}' ({cfg.steps} steps × "
            f"{cfg.prompts_per_step} prompts × {cfg.num_generations})")
        run_one(cfg, name, out, policy, log)
    first_pass = -(-cfg.n_prompts // cfg.prompts_per_step)  # steps until every prompt was sampled once
    histories = {n: add_prompt_deltas(_read_history(out / n), out / n / "completions.jsonl", first_pass)
                 for n in cfg.runs if (out / n / "done.json").exists()}
    results = {"config": asdict(cfg), "runs": {n: {"spec": cfg.runs[n], "seconds": _seconds(out / n),
                                                   "final": final_summary(h), "history": h}
                                               for n, h in histories.items()}}
    atomic_write_json(out / "results.json", nan_to_null(results))  # absent σ / KL / deltas: null
    atomic_write_text(out / "results.md", results_table(results))
    if histories:
        plot_rlhf(histories, {n: cfg.runs[n] for n in histories}, out / "rlhf.png",
                  f"{cfg.algorithm.upper()} on {cfg.n_prompts} AlpacaEval prompts, β={cfg.beta}")
    return results


def _read_history(run: Path) -> list[dict[str, Any]]:
    """history.jsonl rows, null (not available) read back as NaN for the arithmetic and plots."""
    return [{k: math.nan if v is None else v for k, v in json.loads(line).items()}
            for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]


def _seconds(run: Path) -> float:
    return float(json.loads((run / "done.json").read_text()).get("seconds", float("nan")))
