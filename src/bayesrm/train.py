"""Bradley–Terry training loop: AdamW, linear schedule, accumulation, clipping, atomic resumable checkpoints.

Under `accelerate launch --num_processes P` / `torchrun` every optimizer step takes one global batch of P ×
`batch_size` pairs (the batches of a one-process run with batch P·b) and each rank runs its contiguous share of it;
the loss is the mean over the global batch, so P processes with batch b step like one process with batch P·b.
Rank 0 writes checkpoints, metrics and the model; evaluation is sharded over ranks and gathered.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bayesrm import dist
from bayesrm.batching import encode_pairs, pair_rows
from bayesrm.config import TrainConfig
from bayesrm.data import Pair
from bayesrm.integrity import CHECKSUMS_KEY, load_tensors, require_finite, tensor_checksums, verify_checksums
from bayesrm.io import atomic_dir, atomic_write_json, json_text, write_jsonl
from bayesrm.losses import pair_nll
from bayesrm.metrics import pair_metrics
from bayesrm.model import RewardModel
from bayesrm.run import CHECKPOINT_DIR, MODEL_DIR
from bayesrm.shard import shard_range

METRICS_NAME = "metrics.jsonl"


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


def pair_forward(model: torch.nn.Module, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                 pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected in one forward over 2B rows (chosen first)."""
    x, m = pair_rows(chosen, rejected, pad_id, device)  # (2B, T)
    r = model(x, m).float()  # (2B,)
    return r[: len(chosen)], r[len(chosen):]


@torch.no_grad()
def reward_deltas(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> torch.Tensor:
    """r(x, y_w) − r(x, y_l) per pair (MAP)."""
    prompts = [p.prompt for p in pairs]
    rw = model.score(prompts, [p.chosen for p in pairs], batch_size)
    rl = model.score(prompts, [p.rejected for p in pairs], batch_size)
    return rw - rl


def evaluate(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> dict[str, float]:
    """Pairwise accuracy, BT NLL and ECE of the MAP model; under several processes each scores its share."""
    deltas = dist.gather(reward_deltas(model, dist.shard(pairs), batch_size).double().cpu())
    return pair_metrics(torch.cat(deltas))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(blob: dict[str, Any], device: torch.device) -> None:
    """Restore this rank's RNG (rank 0's when the checkpoint came from fewer processes)."""
    ranks = blob.get("rank_rng") or [blob]
    mine = ranks[dist.world()[0]] if dist.world()[0] < len(ranks) else ranks[0]
    torch.set_rng_state(mine["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in mine:
        torch.cuda.set_rng_state(mine["cuda_rng"], device)


def _save_checkpoint(out: Path, model: RewardModel, opt: torch.optim.Optimizer, sched: Any,
                     state: dict[str, Any]) -> None:
    """Trainable weights, optimizer, scheduler, every rank's RNG and the loop position, replaced in one rename.

    Called on every rank (the RNG states are gathered); rank 0 writes.
    """
    from safetensors.torch import save_file

    rngs = dist.gather(_rng_state(model.device))
    if not dist.is_main():
        return
    with atomic_dir(out / CHECKPOINT_DIR) as tmp:
        save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **rngs[0], "rank_rng": rngs},
                   tmp / "optim.pt")
        state_file = {**state, CHECKSUMS_KEY: tensor_checksums(tmp)}
        (tmp / "state.json").write_text(json_text(state_file, out / CHECKPOINT_DIR / "state.json", indent=2))


def _load_checkpoint(out: Path, model: RewardModel, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    ck = out / CHECKPOINT_DIR
    state: dict[str, Any] = json.loads((ck / "state.json").read_text())
    verify_checksums(ck, state, ck / "state.json", required=("trainable.safetensors",))
    state.pop(CHECKSUMS_KEY, None)
    weights = load_tensors(ck / "trainable.safetensors")
    require_finite(weights, ck / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(model.trainable_state()) - set(weights)
    if missing or set(weights) - set(params):
        raise ValueError(f"{ck}: checkpoint does not match the model (missing {sorted(missing)[:3]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    blob = torch.load(ck / "optim.pt", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    _set_rng_state(blob, model.device)
    return state


def _fingerprint(cfg: TrainConfig, model: RewardModel, pairs: Sequence[Pair], num_processes: int = 1) -> str:
    """Hash of everything that decides the trajectory: a resumed run must match it exactly.

    The global batch (batch_size × processes) counts, not how it is split: a run may resume on another P that
    keeps it.
    """
    h = hashlib.sha256()
    run = {k: v for k, v in asdict(cfg).items() if k not in ("eval_batch_size", "checkpoint_every")}
    run["batch_size"] = cfg.batch_size * num_processes
    h.update(json.dumps([run, model.config.to_dict()], sort_keys=True, default=str).encode())
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()[:16]


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: a GPU with bf16 support, or a CPU that oneDNN runs in bf16."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def pair_loss(rw: torch.Tensor, rl: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per-pair training loss (B,): `losses.pair_nll` with the run's margin and centering weight."""
    return pair_nll(rw, rl, cfg.margin, cfg.center_coef)


class _SoloAccelerator:
    """The part of `accelerate.Accelerator` that `train` uses, for one process inside `dist.solo()` (no DDP)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self) -> None:
        from accelerate import PartialState

        self.device = PartialState(cpu=dist.launched_on_cpu()).device  # this rank's device (cuda:LOCAL_RANK, or cpu)

    def prepare(self, *objs: Any) -> Any:
        return objs

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def wait_for_everyone(self) -> None:
        pass

    def no_sync(self, model: torch.nn.Module) -> Any:
        from contextlib import nullcontext

        return nullcontext()


@dataclass
class _Run:
    """What the loop needs besides the model: prepared objects, encoded data and the resumable state."""

    ddp_model: torch.nn.Module
    opt: Any
    sched: Any
    params: list[torch.nn.Parameter]
    chosen: list[list[int]]
    rejected: list[list[int]]
    lengths: list[int]
    total: int
    state: dict[str, Any]


def local_share(batch: Sequence[int], rank: int, size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch of pair indices (sizes differ by at most one)."""
    span = shard_range(len(batch), rank, size)
    return list(batch[span.start:span.stop])


def _micro_step(model: RewardModel, run: _Run, batch: list[int], scale: int, cfg: TrainConfig, acc: Any,
                sync: bool) -> float:
    """Forward + backward of this rank's share of one global micro-batch; returns the global batch's mean loss.

    The loss is Σ_local ℓ · P / |global batch|: DDP averages gradients over the P ranks, so the step sees the mean
    over the global batch, as one process would. A rank left without pairs (batch < P) runs one pair at weight 0 so
    that it still joins the gradient all-reduce. The loss is also divided by the micro-batches of its accumulation
    group; `sync=False` skips the gradient all-reduce (accumulation micro-batches before the last one).
    """
    from contextlib import nullcontext

    device, P = acc.device, acc.num_processes
    idx = local_share(batch, acc.process_index, P)
    weight = P / len(batch)
    if not idx:
        idx, weight = batch[:1], 0.0
    with (nullcontext() if sync or P == 1 else acc.no_sync(run.ddp_model)), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        rw, rl = pair_forward(run.ddp_model, [run.chosen[i] for i in idx], [run.rejected[i] for i in idx],
                              model.pad_id, device)
        per_pair = pair_loss(rw, rl, cfg)
        loss = per_pair.sum() * weight
        reg = model.regularizer(len(run.chosen))  # η·KL of a BNRM head (bayesrm.bnrm); None for the linear head
        if reg is not None:
            loss = loss + reg
        acc.backward(loss / scale)
    total = dist.all_reduce_sum(float(per_pair.detach().sum()) * (weight > 0)) / len(batch)
    return total + (float(reg.detach()) if reg is not None else 0.0)


def _opt_step(run: _Run, cfg: TrainConfig, acc: Any) -> None:
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)


def _run_epoch(model: RewardModel, run: _Run, cfg: TrainConfig, acc: Any, out: Path,
               on_step: Callable[[int, float], None] | None, advance: Callable[[float], None]) -> bool:
    """Continue the current epoch from `state["batch"]`; True when all its batches are done."""
    state = run.state
    batches = epoch_batches(run.lengths, cfg.batch_size * acc.num_processes, cfg.data_seed, state["epoch"],
                            cfg.group_by_length)  # global batches; each rank runs its share
    window: list[float] = []
    while state["batch"] < len(batches) and state["step"] < run.total:
        group_start = state["batch"] - state["batch"] % cfg.grad_accum
        group = min(cfg.grad_accum, len(batches) - group_start)  # the last group of an epoch may be short
        last = state["batch"] - group_start + 1 == group
        loss = _micro_step(model, run, batches[state["batch"]], group, cfg, acc, sync=last)
        state["batch"] += 1
        state["loss_sum"] += loss
        state["loss_n"] += 1
        window = [*window[-49:], loss]
        if state["batch"] - group_start < group:
            continue
        _opt_step(run, cfg, acc)
        state["step"] += 1
        avg = sum(window) / len(window)
        advance(avg)
        if on_step is not None:  # called before this step's checkpoint: raising here resumes from the previous one
            on_step(state["step"], avg)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            _save_checkpoint(out, model, run.opt, run.sched, state)
    return state["batch"] >= len(batches)


def _end_epoch(model: RewardModel, run: _Run, cfg: TrainConfig, acc: Any, out: Path, done: bool,
               eval_pairs: Sequence[Pair]) -> None:
    """Evaluate, append to metrics.jsonl, move to the next epoch and checkpoint (metrics live in the checkpoint)."""
    state = run.state
    row: dict[str, Any] = {"epoch": state["epoch"] + 1, "step": state["step"],
                           "train_loss": state["loss_sum"] / max(state["loss_n"], 1)}
    if eval_pairs:
        row |= {f"eval_{k}": v for k, v in evaluate(model, eval_pairs, cfg.eval_batch_size).items()}
    state["history"].append(row)
    if done:
        state |= {"epoch": state["epoch"] + 1, "batch": 0, "loss_sum": 0.0, "loss_n": 0}
    if acc.is_main_process:
        write_jsonl(out / METRICS_NAME, state["history"])
    _save_checkpoint(out, model, run.opt, run.sched, state)


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
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place with the BT loss; writes checkpoints, metrics.jsonl and the final model.

    Dropout and other torch randomness are seeded from `cfg.data_seed` (the caller's RNG is left as it was).
    With `resume=True` a run continues from `out_dir/checkpoint` and ends with the same weights as an
    uninterrupted run (same data order, optimizer, scheduler and RNG state). `log` gets one line saying whether
    the run resumes or starts fresh. Returns the per-epoch metrics.
    """
    from accelerate import Accelerator

    if not train_pairs:
        raise ValueError("no training pairs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # devices and processes (one per rank, DDP over ranks); autocast is ours so settings can change within a process
    acc: Any = _SoloAccelerator() if dist.in_solo() else Accelerator(cpu=dist.launched_on_cpu())
    if cfg.mixed_precision == "bf16" and not bf16_is_native(acc.device):
        warnings.warn("mixed_precision='bf16' on a CPU without native bf16 matmuls (oneDNN bf16) is ~20x slower "
                      "than fp32; training in fp32", RuntimeWarning, stacklevel=2)
        cfg = replace(cfg, mixed_precision="no")
    model.to(acc.device)
    devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.data_seed)
        run = _setup(model, train_pairs, cfg, acc, out, resume, len(eval_pairs), log)
        _loop(model, run, cfg, acc, out, eval_pairs, on_step, show_progress)
    if acc.is_main_process:
        model.save(out / MODEL_DIR)
    acc.wait_for_everyone()
    model.eval()
    history: list[dict[str, Any]] = run.state["history"]
    return history


def _setup(model: RewardModel, pairs: Sequence[Pair], cfg: TrainConfig, acc: Any, out: Path, resume: bool,
           n_eval: int, log: Callable[[str], None] | None = None) -> _Run:
    """Encode data, build AdamW + linear warm-up/decay schedule, and restore a checkpoint when resuming."""
    from transformers import get_linear_schedule_with_warmup

    chosen, rejected = encode_pairs(model, pairs)
    lengths = [max(len(a), len(b)) for a, b in zip(chosen, rejected, strict=True)]
    n_batches = -(-len(pairs) // (cfg.batch_size * acc.num_processes))  # global batches per epoch
    steps_per_epoch = -(-n_batches // cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    fingerprint = _fingerprint(cfg, model, pairs, acc.num_processes)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "loss_n": 0, "history": [],
                             "fingerprint": fingerprint}
    ck = out / CHECKPOINT_DIR
    say = log if log is not None and acc.is_main_process else (lambda _: None)
    if resume and (ck / "state.json").exists():
        saved = json.loads((ck / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"{ck}: written by a run with other data or settings; resume needs the same ones "
                             "(or start again without resume)")
        state = _load_checkpoint(out, model, opt, sched)
        say(f"resuming from {ck} (step {state['step']} of {total})")
        acc.wait_for_everyone()  # every rank has read the checkpoint before rank 0 may replace it
    else:
        if acc.is_main_process:  # a stale checkpoint must not be resumed into this run later
            if ck.exists():
                shutil.rmtree(ck)
                say(f"starting fresh (resume not requested): removed the earlier checkpoint in {ck}")
            else:
                say(f"starting fresh: no checkpoint in {ck}")
            (out / METRICS_NAME).unlink(missing_ok=True)
    if acc.is_main_process:
        atomic_write_json(out / "train_config.json", {"train": asdict(cfg), "model": asdict(model.config),
                                                      "n_train": len(pairs), "n_eval": n_eval,
                                                      "num_processes": acc.num_processes})
    ddp_model, opt = acc.prepare(model, opt)
    return _Run(ddp_model, opt, sched, params, chosen, rejected, lengths, total, state)


def _loop(model: RewardModel, run: _Run, cfg: TrainConfig, acc: Any, out: Path, eval_pairs: Sequence[Pair],
          on_step: Callable[[int, float], None] | None, show_progress: bool) -> None:
    from bayesrm.progress import Ticker

    state = run.state
    with Ticker("train (steps)", run.total, completed=state["step"],
                enabled=show_progress and acc.is_main_process) as ticker:

        def advance(loss: float) -> None:
            ticker.advance(1, info=f"loss {loss:.4f}")

        while state["epoch"] < cfg.epochs and state["step"] < run.total:
            model.train()
            done = _run_epoch(model, run, cfg, acc, out, on_step, advance)
            _end_epoch(model, run, cfg, acc, out, done, eval_pairs)
            if not done:
                break


def train_on_features(model: RewardModel, train_pairs: Sequence[Pair], cfg: TrainConfig, out_dir: str | Path, *,
                      eval_pairs: Sequence[Pair] = (), cache_dir: str | Path | None = None,
                      log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """`train` for a frozen backbone and a linear head: one cached backbone pass (`features.pair_features`), then
    the same optimisation on the features — the same batches (`epoch_batches`), AdamW, warm-up/decay schedule,
    accumulation, clipping and `pair_loss` — so the head ends where `train` would put it (up to the rounding of
    batched features). Writes train_config.json, metrics.jsonl and the model as `train` does; no checkpoints (the
    whole run takes seconds on the cached features). Returns the per-epoch metrics.
    """
    from transformers import get_linear_schedule_with_warmup

    from bayesrm.features import pair_features
    from bayesrm.heads import LinearHead

    if not model.config.freeze_backbone or not isinstance(model.head, LinearHead):
        raise ValueError("train_on_features needs freeze_backbone=True and the linear head; use train()")
    if not train_pairs:
        raise ValueError("no training pairs")
    if cfg.mixed_precision != "no":
        raise ValueError("train_on_features trains in fp32 (features are fp32); use mixed_precision='no'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()  # the backbone is frozen and its dropout off: train and eval mode give the same features
    feats = pair_features(model, train_pairs, cache_dir, cfg.eval_batch_size, log=log)
    ev = pair_features(model, eval_pairs, cache_dir, cfg.eval_batch_size, log=log) if eval_pairs else None
    chosen, rejected = encode_pairs(model, train_pairs)
    lengths = [max(len(a), len(b)) for a, b in zip(chosen, rejected, strict=True)]
    head = model.head
    fw, fl = feats.chosen.to(model.device), feats.rejected.to(model.device)
    n_batches = -(-len(train_pairs) // cfg.batch_size)
    steps_per_epoch = -(-n_batches // cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    atomic_write_json(out / "train_config.json", {"train": asdict(cfg), "model": asdict(model.config),
                                                  "n_train": len(train_pairs), "n_eval": len(eval_pairs),
                                                  "features": feats.fingerprint})
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(cfg.epochs):
        if step >= total:
            break
        batches = epoch_batches(lengths, cfg.batch_size, cfg.data_seed, epoch, cfg.group_by_length)
        loss_sum, loss_n = 0.0, 0
        for b, idx in enumerate(batches):
            if step >= total:
                break
            group_start = b - b % cfg.grad_accum
            group = min(cfg.grad_accum, len(batches) - group_start)
            i = torch.tensor(idx)
            loss = pair_loss(head(fw[i]), head(fl[i]), cfg).mean()  # head: (B, d) → (B,)
            (loss / group).backward()
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if b + 1 - group_start == group:
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(loss_n, 1)}
        if ev is not None:
            with torch.no_grad():
                delta = head(ev.chosen.to(model.device)) - head(ev.rejected.to(model.device))
            row |= {f"eval_{k}": v for k, v in pair_metrics(delta.double().cpu()).items()}
        history.append(row)
        write_jsonl(out / METRICS_NAME, history)
    model.save(out / MODEL_DIR)
    return history
