"""Scale on paper (docs/scale.md): time and memory of training, the Laplace fit and σ² scoring for 1B and 7B decoders
with LoRA r=8 on q/v, on 46k pairs and on the 12.5M-response best-of-n pool, on 1 and 8 GPUs.

    .venv/bin/python benchmarks/scale_paper.py docs/scale_costs.json > docs/scale_table.md

Inputs are the measured ratios of `per_token_cost.py` (CPU, fp32: train / MAP, factor pass / train, σ² / MAP per
token, and fp64 `eigh` seconds vs size) and the assumptions in ASSUME; absolute GPU time comes from FLOPs: a MAP
forward costs 2N FLOPs per token (N = non-embedding parameters; attention's 4·L·T·d term is ≤ 3% at T = 300 and is
left out), run at MFU × peak.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ASSUME = {
    "peak_bf16_flops": 989e12,  # H100 SXM dense bf16
    "mfu": 0.40,  # model FLOPs utilisation of every pass (forward, or forward + backward) in bf16
    "tokens_per_sequence": 300,  # prompt + response (AlpacaFarm prompts + ≤ 256 sampled tokens)
    "pairs": 46_000,  # Coste et al. training pairs
    "pool": 12_500_000,  # 1,000 prompts × 12,500 responses
    "micro_batch_pairs": 8,  # per GPU, train and fit; σ² scoring 16 responses
    "eig_rank": 64,  # --rank for factors with a side ≥ 2048 (stored eigenvectors d × 64)
    "eigh_threads_speedup": 1.0,  # host LAPACK eigh: measured single-thread, no credit for more threads
}

MODELS: dict[str, dict[str, Any]] = {
    # non-embedding params N, total params, hidden d, layers L, k/v output width, MLP width
    "1B (Llama-3.2-1B shape)": {"N": 0.973e9, "total": 1.236e9, "d": 2048, "L": 16, "kv": 512, "ffn": 8192},
    "7B (Llama-2-7B shape)": {"N": 6.48e9, "total": 6.74e9, "d": 4096, "L": 32, "kv": 4096, "ffn": 11008},
}


def eigh_seconds(d: int, measured: dict[str, float]) -> float:
    """fp64 eigh of d × d from the largest measured size, scaled by d³."""
    big = max(measured, key=int)
    return measured[big] * (d / int(big)) ** 3


def table(costs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    dec = next(r for r in costs["rows"] if r["model"] == "smollm2")  # the decoder's measured ratios
    r_train = dec["train_s_per_token"] / dec["map_s_per_token"]
    r_pass = dec["factors_s_per_token"] / dec["train_s_per_token"]
    r_sigma = dec["sigma2_s_per_token"] / dec["map_s_per_token"]
    a = ASSUME
    rate = a["peak_bf16_flops"] * a["mfu"]
    T = a["tokens_per_sequence"]
    rows, out = [], {}
    for name, m in MODELS.items():
        d, L, N = m["d"], m["L"], m["N"]
        map_tok = 2 * N / rate  # s per token on one GPU
        tok46 = 2 * a["pairs"] * T
        tokpool = a["pool"] * T
        # LoRA on q (d → d) and v (d → kv): lora_A factors A: d × d (q, v); lora_B factors G: d × d (q), kv × kv (v)
        big = [d, d, d, m["kv"]]  # per layer, the large factor of each of the 4 LoRA tensors
        n_fac = 4 * L
        fac_bytes = 8 * L * sum(s * s for s in big)  # fp64 sums during accumulation (on the GPU)
        eig_total = L * sum(eigh_seconds(s, costs["eigh_fp64_cpu_s"]) for s in big) / a["eigh_threads_speedup"]
        stored = 8 * L * sum(s * (a["eig_rank"] if s >= 2048 else s) for s in big)
        act_tok = 34 * d * L  # bytes of bf16 activations per token kept for the backward (Korthikanti et al.)
        hooks_tok = 4 * 2 * L * (d + d + m["kv"] + d)  # fp32 a and δ of the LoRA modules kept by the fit
        mb_tok = 2 * a["micro_batch_pairs"] * T
        w = 2 * m["total"]
        for gpus in (1, 8):
            train = r_train * map_tok * tok46 / gpus
            fit_pass = r_pass * train
            eig = eig_total / gpus  # blocks spread over ranks (dist.spread)
            allreduce = 2 * fac_bytes / 300e9 if gpus > 1 else 0.0  # ring all-reduce at ~300 GB/s NVLink
            sig46 = r_sigma * map_tok * tok46 / gpus
            mappool = map_tok * tokpool / gpus
            sigpool = r_sigma * mappool
            key = f"{name}, {gpus} GPU"
            out[key] = {"train_s": train, "fit_pass_s": fit_pass, "eigh_s": eig, "allreduce_s": allreduce,
                        "fit_s": fit_pass + eig + allreduce, "sigma2_46k_s": sig46, "map_pool_s": mappool,
                        "sigma2_pool_s": sigpool, "mem_train_GB": (w + act_tok * mb_tok) / 1e9,
                        "mem_fit_GB": (w + (act_tok + hooks_tok) * mb_tok + fac_bytes) / 1e9,
                        "mem_sigma2_GB": (w + (act_tok + hooks_tok) * 16 * T + stored) / 1e9,
                        "factor_sums_GB": fac_bytes / 1e9, "stored_posterior_GB": stored / 1e9,
                        "n_factors_eigh": n_fac}
            rows.append((key, out[key]))
    h = lambda s: f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"  # noqa: E731
    lines = ["| model, GPUs | train 1 epoch (46k pairs) | Laplace fit: pass + eigh (+ all-reduce) | σ² of 92k "
             "responses | MAP / σ² of 12.5M pool | GPU memory train / fit / σ² |",
             "|---|---|---|---|---|---|"]
    for key, r in rows:
        lines.append(f"| {key} | {h(r['train_s'])} | {h(r['fit_s'])} = {h(r['fit_pass_s'])} + {h(r['eigh_s'])}"
                     f"{' + ' + h(r['allreduce_s']) if r['allreduce_s'] else ''} | {h(r['sigma2_46k_s'])} | "
                     f"{h(r['map_pool_s'])} / {h(r['sigma2_pool_s'])} | {r['mem_train_GB']:.0f} / "
                     f"{r['mem_fit_GB']:.0f} / {r['mem_sigma2_GB']:.0f} GB |")
    ratios = {"train_over_map": r_train, "fit_pass_over_train": r_pass, "sigma2_over_map": r_sigma}
    return "\n".join(lines), {"assumptions": ASSUME, "models": MODELS, "measured_ratios": ratios, "rows": out}


def main(argv: list[str]) -> None:
    costs = json.loads(Path(argv[0] if argv else "docs/scale_costs.json").read_text())
    md, res = table(costs)
    print(md)
    print()
    print("measured ratios (SmolLM2-135M, CPU fp32): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                  res["measured_ratios"].items()))
    if len(argv) > 1:
        from bayesrm.io import atomic_write_json

        atomic_write_json(argv[1], res)
    assert all(math.isfinite(v) for r in res["rows"].values() for v in r.values())


if __name__ == "__main__":
    main(sys.argv[1:])
