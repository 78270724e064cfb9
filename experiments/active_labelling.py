"""Active labelling on AlpacaEval judged pairs with the fast path: does choosing pairs by BALD or σ_Δ save labels?

    PYTHONPATH=src .venv/bin/python experiments/active_labelling.py       # ~3 min once the features are cached

Data: the 1,200-pair pool and 200 held-out pairs (disjoint prompts) of `judged_pairs.judged_split`, features of the
frozen MiniLM (max_length 256) from the cache that `benchmarks/heads_vs_rewarduq.py` fills (computed here if absent).
Model after every round: a linear head (`feature_heads.train_heads`, Adam 100 epochs, batch 64, l2 1e-3) with the
head-only Laplace posterior (exact GGN, marglik τ), refitted from scratch on the labelled pairs. Each seed starts from
the same 20 random labelled pairs for all three rules, then adds 20 pairs per round chosen from the rest of the pool
by `bayesrm.active` — BALD (mutual information of label and head parameters from μ_Δ and the joint Var Δ), σ_Δ, or
at random — up to 400 labels. Held-out accuracy and NLL (probit predictive) per budget; mean over seeds with a 95%
t-interval, and the paired difference to random per seed. Results are written after every (seed, rule), so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from judged_pairs import judged_split  # noqa: E402

from bayesrm.active import select_top  # noqa: E402
from bayesrm.config import HeadConfig, SelectBy  # noqa: E402
from bayesrm.feature_heads import fit_head_laplace, predict_pairs, train_heads  # noqa: E402
from bayesrm.features import PairFeatures, pair_features  # noqa: E402
from bayesrm.io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from bayesrm.metrics import pair_metrics  # noqa: E402
from bayesrm.model import RewardModel, RMConfig  # noqa: E402

RULES = [SelectBy.RANDOM.value, SelectBy.BALD.value, SelectBy.SIGMA.value]


def run_curve(pool: PairFeatures, test: PairFeatures, rule: str, seed: int, start: int, step: int, budget: int,
              epochs: int) -> list[dict[str, float]]:
    """Held-out metrics after each round of one acquisition rule (same initial labels for every rule of a seed)."""
    labelled = random.Random(seed).sample(range(len(pool)), start)
    rows = []
    while True:
        feats = pool.subset(labelled)
        stack = train_heads(feats, HeadConfig(kind="linear", epochs=epochs, seed=seed))
        post = fit_head_laplace(stack, feats)
        mu, var = predict_pairs(stack, test, post)
        m = pair_metrics(mu, var)
        rows.append({"n": len(labelled), "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                     "map_nll": pair_metrics(mu)["nll"], "tau": post.tau["head"]})
        if len(labelled) >= budget:
            return rows
        rest = sorted(set(range(len(pool))) - set(labelled))
        mu_u, var_u = predict_pairs(stack, pool.subset(rest), post)
        pick = select_top(mu_u, var_u, min(step, budget - len(labelled)), rule, seed=seed * 7919 + len(labelled))
        labelled += [rest[i] for i in pick]


def ci95(x: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over the first axis' entries."""
    from scipy.stats import t

    n = len(x)
    return float(x.mean()), float(t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def summarise(res: dict[str, Any], rules: list[str], seeds: list[int]) -> dict[str, Any]:
    ns = [r["n"] for r in res[f"{rules[0]}/{seeds[0]}"]]
    out: dict[str, Any] = {"n": ns}
    for rule in rules:
        for metric in ("accuracy", "nll"):
            a = np.array([[r[metric] for r in res[f"{rule}/{s}"]] for s in seeds])  # (S, rounds)
            out[f"{rule}/{metric}"] = [ci95(a[:, j]) for j in range(len(ns))]
            if rule != "random":
                b = np.array([[r[metric] for r in res[f"random/{s}"]] for s in seeds])
                out[f"{rule}-random/{metric}"] = [ci95(a[:, j] - b[:, j]) for j in range(len(ns))]
                out[f"{rule}-random/{metric}/mean_over_budgets"] = ci95((a - b).mean(1))
    for rule in rules:  # fewest labels at which the mean curve reaches random's final mean (a label-saving read-out)
        final_acc, final_nll = out["random/accuracy"][-1][0], out["random/nll"][-1][0]
        out[f"{rule}/labels_to_random_final_accuracy"] = next(
            (n for n, (m, _) in zip(ns, out[f"{rule}/accuracy"], strict=True) if m >= final_acc), None)
        out[f"{rule}/labels_to_random_final_nll"] = next(
            (n for n, (m, _) in zip(ns, out[f"{rule}/nll"], strict=True) if m <= final_nll), None)
    return out


def plot(summary: dict[str, Any], rules: list[str], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ns = np.array(summary["n"])
    for ax, metric, label in zip(fig.subplots(1, 2), ("accuracy", "nll"), ("held-out accuracy", "held-out NLL"),
                                 strict=True):
        for rule in rules:
            m, h = np.array(summary[f"{rule}/{metric}"]).T
            ax.plot(ns, m, marker="o", markersize=3, label=rule)
            ax.fill_between(ns, m - h, m + h, alpha=0.2, linewidth=0)
        ax.set_xlabel("labelled pairs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)


def markdown(summary: dict[str, Any], rules: list[str], seeds: list[int], every: int) -> str:
    lines = [f"Mean over {len(seeds)} seeds ± 95% t-interval half-width; Δ columns are paired differences to random "
             "(accuracy: > 0 is better; NLL: < 0 is better).", "",
             "| labels | " + " | ".join(f"{r} acc" for r in rules) + " | " + " | ".join(f"{r} NLL" for r in rules)
             + " | " + " | ".join(f"Δacc {r}" for r in rules if r != "random") + " | "
             + " | ".join(f"ΔNLL {r}" for r in rules if r != "random") + " |"]
    lines.append("|" + "---|" * (1 + 2 * len(rules) + 2 * (len(rules) - 1)))
    for j, n in enumerate(summary["n"]):
        if j % every and j != len(summary["n"]) - 1:
            continue
        cells = [str(n)]
        cells += [f"{summary[f'{r}/accuracy'][j][0]:.3f} ± {summary[f'{r}/accuracy'][j][1]:.3f}" for r in rules]
        cells += [f"{summary[f'{r}/nll'][j][0]:.3f} ± {summary[f'{r}/nll'][j][1]:.3f}" for r in rules]
        for metric in ("accuracy", "nll"):
            cells += [f"{summary[f'{r}-random/{metric}'][j][0]:+.3f} ± {summary[f'{r}-random/{metric}'][j][1]:.3f}"
                      for r in rules if r != "random"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rules:
        if r == "random":
            continue
        for metric in ("accuracy", "nll"):
            m, h = summary[f"{r}-random/{metric}/mean_over_budgets"]
            better = m > 0 if metric == "accuracy" else m < 0
            verdict = "no difference resolved (null)" if abs(m) <= h else ("better than random" if better
                                                                            else "worse than random")
            lines.append(f"- {r} − random, {metric} averaged over all budgets: {m:+.4f} ± {h:.4f} → {verdict}")
    for r in rules:
        acc, nll = summary[f"{r}/labels_to_random_final_accuracy"], summary[f"{r}/labels_to_random_final_nll"]
        lines.append(f"- {r}: labels at which its mean first reaches random's final mean: accuracy {acc}, NLL {nll}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-pool", type=int, default=1200)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--step", type=int, default=20)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "features"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "active_labelling"), help="resumable per-run results")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="active_labelling.{json,png,md} go here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    pool_pairs, test_pairs = judged_split(args.n_pool, args.n_test)
    model = RewardModel(RMConfig(max_length=args.max_length, freeze_backbone=True))
    pool = pair_features(model, pool_pairs, args.cache_dir, log=print)
    test = pair_features(model, test_pairs, args.cache_dir, log=print)
    partial = Path(args.work) / "partial.json"
    res: dict[str, Any] = json.loads(partial.read_text()) if partial.exists() else {}
    key = {"pool": pool.fingerprint, "test": test.fingerprint, **{k: v for k, v in vars(args).items()
                                                                   if k not in ("work", "out", "seeds")}}
    if res.get("key", key) != key:
        raise SystemExit(f"{partial}: from a run with other settings; delete it or pass another --work")
    res["key"] = key
    seeds = list(range(args.seeds))
    for seed in seeds:
        for rule in RULES:
            if f"{rule}/{seed}" in res:
                continue
            res[f"{rule}/{seed}"] = run_curve(pool, test, rule, seed, args.start, args.step, args.budget, args.epochs)
            atomic_write_json(partial, res)
            last = res[f"{rule}/{seed}"][-1]
            print(f"seed {seed} {rule}: n={last['n']} acc {last['accuracy']:.3f} nll {last['nll']:.3f}", flush=True)
    summary = summarise(res, RULES, seeds)
    out = Path(args.out)
    title = (f"Active labelling, AlpacaEval judged pairs (pool {args.n_pool}, test {args.n_test}), linear head + "
             f"head Laplace on frozen MiniLM, {len(seeds)} seeds")
    plot(summary, RULES, out / "active_labelling.png", title)
    atomic_write_json(out / "active_labelling.json", {"settings": key, "summary": summary,
                                                      "runs": {k: v for k, v in res.items() if k != "key"}})
    table = markdown(summary, RULES, seeds, every=max(1, len(summary["n"]) // 10))
    atomic_write_text(out / "active_labelling.md", f"# {title}\n\nWritten by `experiments/active_labelling.py` "
                      "(setup in its docstring); plot `active_labelling.png`, all curves `active_labelling.json`."
                      f"\n\n![curves](active_labelling.png)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
