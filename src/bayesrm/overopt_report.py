"""Best-of-n on the stored SmolLM2 pool scores (issue 14): curves, Gao fits, the method table, σ's mechanism.

Reads only cached scores (pool_dir/scores/eval/*): redraws every curve in minutes without regenerating.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesrm.bon import BonCurve, bon_curve, bon_estimate, default_ns, fit_gao_bon, gao_bon_peak, kl_bon
from bayesrm.io import atomic_write_json, atomic_write_text
from bayesrm.metrics import auroc
from bayesrm.objectives import parse_spec, reference_stats, standardize, standardize_var
from bayesrm.overopt import OveroptConfig, _timed, eval_shards, gold_scores, load_part, member_scores

HEAD = "head:"  # method prefix: the same spec with the head-only (last-layer) Laplace variance


def selection(spec: str, mean: torch.Tensor, var: torch.Tensor, var_head: torch.Tensor) -> torch.Tensor:
    """A method's selection reward (N,) from member scores (M, N); single-model specs read member 0."""
    v = var_head if spec.startswith(HEAD) else var
    s = parse_spec(spec.removeprefix(HEAD))
    if not s.needs_ensemble:
        return s.apply(mean[:1], v[:1])
    # BT rewards have a per-member shift and scale: ensemble specs see members standardised on the pool (π_ref)
    ref_mean, ref_std = reference_stats(mean)
    return s.apply(standardize(mean, ref_mean, ref_std), standardize_var(v, ref_std))


def gao_fit_ci(kl: np.ndarray, gold_pp: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Gao BoN fit (α, β, peak d* = α/2β, R*) of the prompt-mean curve, with percentile CIs over prompts.

    No peak (β ≤ 0: gold still rising) is reported as null, and so is a CI end that falls on a no-peak replicate.
    """
    finite = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
    alpha, beta = fit_gao_bon(kl, gold_pp.mean(0))
    d_star, r_star = gao_bon_peak(alpha, beta)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        a, b = fit_gao_bon(kl, gold_pp[rng.integers(0, len(gold_pp), len(gold_pp))].mean(0))
        reps.append((a, b, gao_bon_peak(a, b)[0]))
    arr = np.asarray(reps)  # (B, 3)
    lo, hi = np.quantile(arr, [0.025, 0.975], axis=0, method="inverted_cdf")  # order statistics: no lerp over ∞
    return {"alpha": alpha, "beta": beta, "peak_d": finite(d_star), "peak_kl": finite(d_star**2),
            "peak_gold_gain": finite(r_star), "alpha_ci": [lo[0], hi[0]], "beta_ci": [lo[1], hi[1]],
            "peak_d_ci": [finite(lo[2]), finite(hi[2])], "peak_fraction": float(np.isfinite(arr[:, 2]).mean())}


def sigma_mechanism(proxy: np.ndarray, gold: np.ndarray, sigma: np.ndarray) -> float | None:
    """AUROC of σ for top-decile-by-proxy samples whose gold is below the prompt's median, vs the other top decile.

    (P, N) arrays; None when the top deciles hold only one of the two kinds.
    """
    pos, neg = [], []
    for p, g, s in zip(proxy, gold, sigma, strict=True):
        top = np.argsort(p, kind="stable")[-max(1, len(p) // 10):]
        bad = g[top] < np.median(g)
        pos.append(s[top][bad])
        neg.append(s[top][~bad])
    p_all, n_all = np.concatenate(pos), np.concatenate(neg)
    return auroc(p_all, n_all) if len(p_all) and len(n_all) else None


def run_report(cfg: OveroptConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Curves, fits, table, mechanism; results.json/results.md and PNGs in cfg.eval.results_dir."""
    from bayesrm.plots import plot_bon, plot_k_sweep

    t0 = time.time()
    e = cfg.eval
    shards = eval_shards(cfg)
    pool = load_part(cfg, "eval", shards)
    if len(pool) < e.min_prompts:
        raise ValueError(f"{cfg.pool_dir}/eval: {len(pool)} complete evaluation prompts, eval.min_prompts is "
                         f"{e.min_prompts}; let generation finish more shards or lower min_prompts")
    n_pool = cfg.generation.n_eval
    gold = gold_scores(cfg, "eval", shards, log).reshape(len(pool), n_pool)
    ms = {k: torch.as_tensor(v) for k, v in member_scores(cfg, "eval", shards, log).items()}
    mean, var, var_head = ms["mean"], ms["var"], ms["var_head"]  # (M, P·N)
    map_proxy = mean[0].numpy().reshape(len(pool), n_pool)
    ns = default_ns(max(1, int(n_pool * e.max_n_frac)))
    kl = kl_bon(ns)
    curves: list[BonCurve] = []
    per_prompt: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in e.methods:
        if parse_spec(name.removeprefix(HEAD)).needs_ensemble and cfg.proxy.members < 2:
            continue
        sel = selection(name, mean, var, var_head).numpy().reshape(len(pool), n_pool)
        curves.append(bon_curve(name, sel, map_proxy, gold, ns, n_boot=e.n_boot, seed=cfg.seed))
        per_prompt[name] = bon_estimate(sel, gold, ns)  # (P, K)
        rows[name] = {"gao": gao_fit_ci(kl, per_prompt[name], e.n_boot, cfg.seed)}
    base = per_prompt["map"]
    peak = int(np.argmax(base.mean(0)))
    rng = np.random.default_rng(cfg.seed)
    idx = rng.integers(0, len(pool), size=(e.n_boot, len(pool)))
    for name, pp in per_prompt.items():
        diff = pp[:, -1] - base[:, -1]
        boots = diff[idx].mean(1)
        rows[name] |= {"gold_at_map_peak": float(pp[:, peak].mean()), "gold_at_max_n": float(pp[:, -1].mean()),
                       "diff_vs_map_at_max_n": float(diff.mean()),
                       "diff_ci": [float(x) for x in np.quantile(boots, [0.025, 0.975])]}
    sweep: dict[str, dict[float, float]] = {"std": {}, "var": {}}
    for pen in ("std", "var"):
        for k in e.k_sweep:
            sel = selection(f"la:{pen}:k={k}", mean, var, var_head).numpy().reshape(len(pool), n_pool)
            sweep[pen][float(k)] = float(bon_estimate(sel, gold, [ns[-1]]).mean())
    sig = {"laplace_lora": var[0].sqrt(), "laplace_head": var_head[0].sqrt()}
    if cfg.proxy.members > 1:
        sig["ensemble_std"] = mean.std(0)
    mech = {k: sigma_mechanism(map_proxy, gold, v.numpy().reshape(len(pool), n_pool)) for k, v in sig.items()}
    out = Path(e.results_dir)
    results = {"config": asdict(cfg), "n_prompts": len(pool), "n_pool": n_pool, "ns": ns, "kl": kl.tolist(),
               "map_peak_n": ns[peak], "methods": rows, "k_sweep_gold_at_max_n": sweep, "sigma_auroc": mech,
               "curves": [c.to_dict() for c in curves], "seconds": time.time() - t0}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_table(results))
    plot_bon(curves, out / "bon.png", f"Best-of-n, SmolLM2-135M pool: {len(pool)} prompts × {n_pool} samples")
    plot_k_sweep(sweep, out / "k_sweep.png", f"Penalty weight k: gold at n={ns[-1]}")
    plot_scatter(map_proxy, gold, sig["laplace_lora"].numpy().reshape(len(pool), n_pool), out / "mechanism.png")
    _timed(cfg, "report", time.time() - t0)
    return results


def results_table(r: dict[str, Any]) -> str:
    """Markdown: per method gold at MAP's peak and at the largest n, paired difference to MAP, Gao fit."""
    lines = [f"{r['n_prompts']} prompts × {r['n_pool']} samples; MAP's empirical gold peak at n={r['map_peak_n']}; "
             f"largest n={r['ns'][-1]} (KL {r['kl'][-1]:.2f} nats)", "",
             "| method | gold @ MAP peak | gold @ max n | Δ vs MAP @ max n [95% CI] | Gao α | Gao β | peak KL |",
             "|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        g = m["gao"]
        lines.append(f"| {name} | {m['gold_at_map_peak']:.3f} | {m['gold_at_max_n']:.3f} | "
                     f"{m['diff_vs_map_at_max_n']:+.3f} [{m['diff_ci'][0]:+.3f}, {m['diff_ci'][1]:+.3f}] | "
                     f"{g['alpha']:.3f} | {g['beta']:.3f} | "
                     f"{'none' if g['peak_kl'] is None else format(g['peak_kl'], '.2f')} |")
    lines += ["", "σ mechanism (AUROC of σ for top-decile-by-proxy samples with gold below the prompt median): "
              + ", ".join(f"{k} {'null' if v is None else format(v, '.3f')}" for k, v in r["sigma_auroc"].items())]
    return "\n".join(lines) + "\n"


def plot_scatter(proxy: np.ndarray, gold: np.ndarray, sigma: np.ndarray, path: Path, max_points: int = 20_000
                 ) -> None:
    """Proxy vs gold (both centred per prompt), coloured by the Laplace σ."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bayesrm.plots import _save_atomic

    x = (proxy - proxy.mean(1, keepdims=True)).ravel()
    y = (gold - gold.mean(1, keepdims=True)).ravel()
    c = sigma.ravel()
    keep = np.random.default_rng(0).permutation(x.size)[:max_points]
    fig = Figure(figsize=(6.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sc = ax.scatter(x[keep], y[keep], c=c[keep], s=3, cmap="viridis", alpha=0.6)
    fig.colorbar(sc, ax=ax, label="Laplace σ (member 0)")
    ax.set_xlabel("proxy reward (MAP, centred per prompt)")
    ax.set_ylabel("gold reward (centred per prompt)")
    ax.grid(True, alpha=0.3)
    _save_atomic(fig, path)
