"""Bradley–Terry training loop: AdamW, linear schedule, accumulation, clipping, atomic resumable checkpoints."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import Pair
from bayesrm.io import atomic_dir, atomic_write_json, write_jsonl
from bayesrm.losses import bradley_terry_loss, centering_penalty
from bayesrm.metrics import pair_metrics
from bayesrm.model import RewardModel
from bayesrm.templates import collate

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"


@dataclass
class TrainConfig:
    """Optimisation settings (paper App. C.2: batch 8, linear schedule, weight decay 0)."""

    epochs: int = 1  # passes over the training pairs
    lr: float = 2e-4  # AdamW learning rate (peak)
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.03  # fraction of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    margin: float = 0.0  # BT margin m in −log σ(r_w − r_l − m)
    center_coef: float = 0.0  # weight of the reward-centering term (r_w + r_l)²
    data_seed: int = 0  # data order (LoRA init is RMConfig.lora_seed)
    group_by_length: bool = True  # batches of similar length, in random order
    mixed_precision: str = "no"  # no | bf16 (autocast; bf16 also helps on AVX-512-BF16 CPUs)
    eval_batch_size: int = 32  # responses per scoring batch
    checkpoint_every: int = 100  # optimizer steps between atomic checkpoints (0: only at epoch ends)
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
                  ) -> list[list[int]]:
    """Deterministic batches of pair indices for one epoch; length-grouped within mega-batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 32
    batches: list[list[int]] = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def encode_pairs(model: RewardModel, pairs: Sequence[Pair]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of chosen and rejected responses."""
    prompts = [p.prompt for p in pairs]
    return (model.encode(prompts, [p.chosen for p in pairs]), model.encode(prompts, [p.rejected for p in pairs]))


def pair_forward(model: torch.nn.Module, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                 pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected in one forward over 2B rows (chosen first)."""
    x, m = collate(list(chosen) + list(rejected), pad_id)  # (2B, T)
    r = model(x.to(device), m.to(device)).float()  # (2B,)
    return r[: len(chosen)], r[len(chosen):]


@torch.no_grad()
def reward_deltas(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> torch.Tensor:
    """r(x, y_w) − r(x, y_l) per pair (MAP)."""
    prompts = [p.prompt for p in pairs]
    rw = model.score(prompts, [p.chosen for p in pairs], batch_size)
    rl = model.score(prompts, [p.rejected for p in pairs], batch_size)
    return rw - rl


def evaluate(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> dict[str, float]:
    """Pairwise accuracy, BT NLL and ECE of the MAP model."""
    return pair_metrics(reward_deltas(model, pairs, batch_size))


def _save_checkpoint(out: Path, model: RewardModel, opt: torch.optim.Optimizer, sched: Any,
                     state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out / CHECKPOINT_DIR) as tmp:
        save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def _load_checkpoint(out: Path, model: RewardModel, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    ck = out / CHECKPOINT_DIR
    weights = load_file(str(ck / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    blob = torch.load(ck / "optim.pt", weights_only=False)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state: dict[str, Any] = json.loads((ck / "state.json").read_text())
    return state


def train(
    model: RewardModel,
    train_pairs: Sequence[Pair],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    eval_pairs: Sequence[Pair] = (),
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Train `model` in place with the BT loss; writes checkpoints, metrics.jsonl and the final model.

    With `resume=True` a run continues from `out_dir/checkpoint` and ends with the same weights as an
    uninterrupted run (same data order, optimizer and scheduler state). Returns the per-epoch metrics.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    if not train_pairs:
        raise ValueError("no training pairs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
    acc = Accelerator()  # devices and processes; autocast is ours so settings can change within a process
    model.to(acc.device)
    chosen, rejected = encode_pairs(model, train_pairs)
    lengths = [max(len(a), len(b)) for a, b in zip(chosen, rejected, strict=True)]
    n_batches = -(-len(train_pairs) // cfg.batch_size)
    per_proc = -(-n_batches // acc.num_processes)
    steps_per_epoch = max(1, per_proc // cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0}
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if resume and (out / CHECKPOINT_DIR / "state.json").exists():
        state = _load_checkpoint(out, model, opt, sched)
        if metrics_path.exists():
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    elif metrics_path.exists():
        metrics_path.unlink()
    atomic_write_json(out / "train_config.json", {"train": asdict(cfg), "model": asdict(model.config),
                                                  "n_train": len(train_pairs), "n_eval": len(eval_pairs)})
    ddp_model, opt = acc.prepare(model, opt)
    device = acc.device

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not show_progress or not acc.is_main_process)
    with progress:
        task = progress.add_task("train", total=total, completed=state["step"], info="")
        while state["epoch"] < cfg.epochs and state["step"] < total:
            model.train()
            batches = epoch_batches(lengths, cfg.batch_size, cfg.data_seed, state["epoch"], cfg.group_by_length)
            batches = batches[acc.process_index::acc.num_processes][: steps_per_epoch * cfg.grad_accum]
            running: list[float] = []
            while state["batch"] < len(batches) and state["step"] < total:
                idx = batches[state["batch"]]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                    rw, rl = pair_forward(ddp_model, [chosen[i] for i in idx], [rejected[i] for i in idx],
                                          model.pad_id, device)
                    loss_vec = bradley_terry_loss(rw, rl, cfg.margin)
                    if cfg.center_coef:
                        loss_vec = loss_vec + cfg.center_coef * centering_penalty(rw, rl)
                    loss = loss_vec.mean() / cfg.grad_accum
                acc.backward(loss)
                running.append(float(loss) * cfg.grad_accum)
                state["batch"] += 1
                if state["batch"] % cfg.grad_accum == 0:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    state["step"] += 1
                    avg = sum(running[-50:]) / len(running[-50:])
                    progress.update(task, advance=1, info=f"loss {avg:.4f}")
                    if on_step is not None:
                        on_step(state["step"], avg)
                    if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and acc.is_main_process:
                        _save_checkpoint(out, model, opt, sched, state)
            epoch_done = state["batch"] >= len(batches)
            row: dict[str, Any] = {"epoch": state["epoch"] + 1, "step": state["step"],
                                   "train_loss": sum(running) / max(len(running), 1)}
            if eval_pairs and acc.is_main_process:
                row |= {f"eval_{k}": v for k, v in evaluate(model, eval_pairs, cfg.eval_batch_size).items()}
            history.append(row)
            if acc.is_main_process:
                write_jsonl(metrics_path, history)
            if epoch_done:
                state["epoch"] += 1
                state["batch"] = 0
            if acc.is_main_process:
                _save_checkpoint(out, model, opt, sched, state)
            if not epoch_done:
                break
    if acc.is_main_process:
        model.save(out / MODEL_DIR)
    acc.wait_for_everyone()
    model.eval()
    return history
