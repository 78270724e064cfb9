"""Measured per-token costs behind docs/scale.md: MAP forward, a training step (BT forward + backward + AdamW),
the KFAC Laplace fit and σ² scoring, per token, for the embedded MiniLM (22M) and SmolLM2-135M, plus fp64 `eigh`
of a d × d factor.

    .venv/bin/python benchmarks/per_token_cost.py --out docs/scale_costs.json     # ~5 min on 1 core

Setup: LoRA r=8, α=16 on the attention query/value projections, fp32, 1 thread, `--pairs` pairs of exactly
`--length` tokens per response (random token ids: cost does not depend on the text), batch `--batch` pairs.
Each cost is the least-CPU of `--reps` runs after a warm-up; CPU time, since other jobs share the cores. The ratio
columns (fit / train step, σ² / MAP) are what docs/scale.md carries to GPUs; FLOPs/token = 2N (forward) are printed
to turn seconds into an achieved rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import Pair
from bayesrm.laplace import LaplaceConfig, fit_laplace, kfac_factors
from bayesrm.model import RewardModel, RMConfig
from bayesrm.rlhf import PolicyConfig, policy_path
from bayesrm.train import TrainConfig, train


def cpu_time(fn: Callable[[], Any], reps: int) -> float:
    """Least process-CPU seconds of `reps` calls."""
    best = float("inf")
    for _ in range(reps):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def fixed_length_pairs(model: RewardModel, n: int, length: int, seed: int = 0) -> list[Pair]:
    """Pairs whose chosen and rejected are `length` tokens under the model's template (text of repeated words)."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    out = []
    for i in range(n):
        pick = torch.randint(0, len(words), (4 * length,), generator=g).tolist()
        text = " ".join(words[j] for j in pick)
        out.append(Pair(f"question {i}", text, " ".join(reversed(text.split())), id=str(i)))
    ids = model.encode([p.prompt for p in out], [p.chosen for p in out])
    if any(len(s) != length for s in ids):
        raise SystemExit(f"responses are not {length} tokens after truncation (max_length)")
    return out


def measure(name: str, cfg: RMConfig, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = RewardModel(cfg)
    with torch.no_grad():  # B ≠ 0 so every LoRA tensor has curvature, as after training
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02)
    pairs = fixed_length_pairs(model, args.pairs, args.length)
    tokens = 2 * args.pairs * args.length  # per pass over the pairs (chosen + rejected)
    base = model.backbone.get_base_model()
    embed = {id(p) for m in base.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    n_params = sum(p.numel() for p in base.parameters() if id(p) not in embed)  # matmul weights: 2N FLOPs/token
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    bs = args.batch

    model.score(prompts[:bs], responses[:bs], batch_size=bs)  # warm-up
    t_map = cpu_time(lambda: model.score(prompts, responses, batch_size=2 * bs), args.reps)
    tc = TrainConfig(epochs=1, batch_size=bs, checkpoint_every=0, group_by_length=False)
    with tempfile.TemporaryDirectory() as out:
        t_train = cpu_time(lambda: train(model, pairs, tc, out, show_progress=False), 1)
    model.eval()
    lc = LaplaceConfig(batch_size=bs)
    t_factors = cpu_time(lambda: kfac_factors(model, pairs, lc.kfac, bs), args.reps)
    t_fit = cpu_time(lambda: fit_laplace(model, pairs, lc), 1)
    post = fit_laplace(model, pairs, lc)
    t_var = cpu_time(lambda: post.predict(model, prompts, responses, batch_size=2 * bs), args.reps)
    sides = sorted({int(s) for b in post.blocks.values() for s in b.shape})
    big = max(sides)
    row = {"model": name, "params_non_embedding": n_params, "hidden": big, "lora_tensors": len(post.blocks),
           "lora_params": sum(b.theta.numel() for b in post.blocks.values()), "tokens": tokens,
           "flops_fwd_per_token": 2 * n_params,
           "map_s_per_token": t_map / tokens, "train_s_per_token": t_train / tokens,
           "factors_s_per_token": t_factors / tokens, "fit_s_per_token": t_fit / tokens,
           "sigma2_s_per_token": t_var / tokens}
    row["fit_over_train"] = row["fit_s_per_token"] / row["train_s_per_token"]
    row["sigma2_over_map"] = row["sigma2_s_per_token"] / row["map_s_per_token"]
    row["train_over_map"] = row["train_s_per_token"] / row["map_s_per_token"]
    row["map_gflops"] = row["flops_fwd_per_token"] / row["map_s_per_token"] / 1e9
    return row


def eigh_times(sizes: Sequence[int], reps: int) -> dict[str, float]:
    out = {}
    for d in sizes:
        x = torch.randn(d, d, dtype=torch.double)
        F = x @ x.T
        out[str(d)] = cpu_time(functools.partial(torch.linalg.eigh, F), reps)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--eigh", type=int, nargs="*", default=[384, 576, 1152, 2304])
    ap.add_argument("--models", nargs="*", default=["minilm", "smollm2"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    L = args.length
    cfgs = {"minilm": RMConfig(max_length=L, lora_r=8, lora_alpha=16, target_modules=["query", "value"]),
            "smollm2": RMConfig(backbone=policy_path(PolicyConfig()), max_length=L, lora_r=8, lora_alpha=16,
                                target_modules=["q_proj", "v_proj"], template="plain")}
    rows = []
    for name in args.models:
        row = measure(name, cfgs[name], args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    eig = eigh_times(args.eigh, args.reps)
    print("eigh fp64 CPU s:", eig)
    res = {"rows": rows, "eigh_fp64_cpu_s": eig, "threads": 1, "length": args.length, "batch_pairs": args.batch,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        from bayesrm.io import atomic_write_json

        atomic_write_json(args.out, res)
    print(f"{'model':<10}{'map µs/tok':>12}{'train':>10}{'fit':>10}{'σ²':>10}{'fit/train':>11}{'σ²/map':>9}")
    for r in rows:
        print(f"{r['model']:<10}{1e6 * r['map_s_per_token']:12.1f}{1e6 * r['train_s_per_token']:10.1f}"
              f"{1e6 * r['fit_s_per_token']:10.1f}{1e6 * r['sigma2_s_per_token']:10.1f}{r['fit_over_train']:11.2f}"
              f"{r['sigma2_over_map']:9.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
