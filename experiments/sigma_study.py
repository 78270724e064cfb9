"""Issue 15.1 (partial): is Laplace σ informative, and which τ / temperature / subset makes it so?

On one trained proxy (default: the `make demo` proxy of experiments/truncation.py), one Jacobian pass per pair
set caches μ_Δ and the τ-independent grids S (`LaplacePosterior.pair_cache`), so every prior precision and
temperature is evaluated without another backward. Reports, per variant: AUROC of σ_Δ for the MAP's errors on
held-out in-domain pairs (half B; half A tunes val-NLL τ), OOD AUROC of σ_Δ (hh-rlhf harmless vs in-domain),
Spearman(σ_Δ, response length), validation NLL; baselines: −|μ_Δ| for errors.

    python experiments/sigma_study.py --run runs/truncation/v1/proxy/member_0 --val runs/truncation/v1/data/val.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bayesrm.data import load_pairs
from bayesrm.io import atomic_write_json, atomic_write_text
from bayesrm.kfac import kron_variance
from bayesrm.laplace import LaplacePosterior, fit_laplace
from bayesrm.metrics import auroc, probit_probability
from bayesrm.model import RewardModel


def variance(post: LaplacePosterior, S: dict[str, torch.Tensor], tau: dict[str, float], T: float) -> torch.Tensor:
    """Var(Δ) per pair from cached grids at prior precision `tau` and temperature T."""
    return sum(kron_variance(S[k], post._grids[k][0], tau[k], T) for k in post.blocks)  # type: ignore[return-value]


def row(name: str, mu: torch.Tensor, var: torch.Tensor, mu_ood: torch.Tensor, var_ood: torch.Tensor,
        lengths: np.ndarray) -> dict[str, float | str]:
    err = (mu <= 0).numpy()
    sd, sd_ood = var.sqrt().numpy(), var_ood.sqrt().numpy()
    z = np.abs(mu.numpy()) / np.maximum(sd, 1e-12)  # |μ_Δ|/σ_Δ; σ_Δ = 0 only for identical responses
    p = probit_probability(mu, var)
    return {"variant": name, "err_auroc_sigma": auroc(sd[err], sd[~err]) if err.any() and (~err).any() else math.nan,
            "ood_auroc_sigma": auroc(sd_ood, sd), "spearman_sigma_length": float(spearmanr(sd, lengths).statistic),
            "spearman_sigma_abs_mu": float(spearmanr(sd, np.abs(mu.numpy())).statistic),
            "err_auroc_neg_z": auroc(-z[err], -z[~err]),
            "nll": float(-torch.log(p.clamp_min(1e-12)).mean()), "sigma_median": float(np.median(sd))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/truncation/v1/proxy/member_0")
    ap.add_argument("--val", default="runs/truncation/v1/data/val.jsonl")
    ap.add_argument("--train", default="runs/truncation/v1/data/train.jsonl")
    ap.add_argument("--ood", default="../shared/data/hh-rlhf/harmless-base/test.jsonl.gz")
    ap.add_argument("--n-ood", type=int, default=200)
    ap.add_argument("--out", default="docs/sigma_study")
    args = ap.parse_args()
    model = RewardModel.load(args.run)
    post = LaplacePosterior.load(args.run, model)
    val = load_pairs(args.val)
    ood = load_pairs(args.ood, skip_invalid=True, limit=args.n_ood)
    half = len(val) // 2
    tune, test = val[:half], val[half:]
    mu_a, S_a = post.pair_cache(model, tune)
    mu, S = post.pair_cache(model, test)
    mu_o, S_o = post.pair_cache(model, ood)
    lengths = np.array([len(p.chosen) + len(p.rejected) for p in test], dtype=float)
    rows = []
    base = dict(post.tau)
    T0 = post.cfg.temperature
    for name, tau, T in [("marglik, layerwise τ (default)", base, T0)]:
        rows.append(row(name, mu, variance(post, S, tau, T), mu_o, variance(post, S_o, tau, T), lengths))
    for meth, struct in (("marglik", "global"), ("mackay", "layerwise")):
        tau = post.optimize_prior_precision(meth, struct)
        rows.append(row(f"{meth}, {struct} τ", mu, variance(post, S, tau, T0), mu_o, variance(post, S_o, tau, T0),
                        lengths))
    tau = post.optimize_prior_precision("val_nll", "global", val_data=(mu_a, S_a))
    rows.append(row("val-NLL global τ (tuned on half A)", mu, variance(post, S, tau, T0), mu_o,
                    variance(post, S_o, tau, T0), lengths))
    for T in (0.1, 10.0):
        rows.append(row(f"default τ, temperature T={T}", mu, variance(post, S, base, T), mu_o,
                        variance(post, S_o, base, T), lengths))
    train = load_pairs(args.train)
    head = fit_laplace(model, train, replace(post.cfg, subset="head"))
    hm, hS = head.pair_cache(model, test)
    hmo, hSo = head.pair_cache(model, ood)
    rows.append(row("head-only Laplace, marglik τ", hm, variance(head, hS, head.tau, 1.0), hmo,
                    variance(head, hSo, head.tau, 1.0), lengths))
    err = (mu <= 0).numpy()
    base_err = auroc(-np.abs(mu.numpy())[err], -np.abs(mu.numpy())[~err])
    lines = [f"In-domain test pairs: {len(test)} (MAP accuracy {float((mu > 0).double().mean()):.3f}); OOD: "
             f"{len(ood)} hh-rlhf harmless pairs. Baseline AUROC of −|μ_Δ| for errors: {base_err:.3f}.", "",
             "| variant | error AUROC of σ_Δ | error AUROC of −|μ_Δ|/σ_Δ | OOD AUROC of σ_Δ | Spearman(σ_Δ, length) "
             "| Spearman(σ_Δ, |μ_Δ|) | NLL | median σ_Δ |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['err_auroc_sigma']:.3f} | {r['err_auroc_neg_z']:.3f} | "
                     f"{r['ood_auroc_sigma']:.3f} | {r['spearman_sigma_length']:.3f} | "
                     f"{r['spearman_sigma_abs_mu']:.3f} | {r['nll']:.4f} | {r['sigma_median']:.3f} |")
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"rows": rows, "baseline_err_auroc_neg_abs_mu": base_err})
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(rows)[:200])


if __name__ == "__main__":
    main()
