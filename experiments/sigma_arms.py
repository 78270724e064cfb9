"""Issue 15.1, the remaining arms: does any uncertainty method make σ_Δ point at errors or at shifted data?

On the `make demo` proxy's data (runs/truncation/v1: 1,200 noisy AlpacaEval pairs, MiniLM LoRA r 8), every arm
is trained on the same pairs with the same config and compared on the same test pairs (the second half of the
validation pairs, as in experiments/sigma_study.py) and the same shifted sets:

- hh-rlhf harmless test pairs (another dataset);
- synthetic shifts of the test pairs: responses cut to their first 20% of words, responses with their words
  shuffled, and responses paired with another test pair's prompt (off-prompt).

Arms: Laplace-LoRA (pair KFAC, marglik τ; the default), the same posterior's σ_Δ relative to its prior σ_Δ (the
shrinkage along the pair's direction, which removes the ‖J_Δ‖ scale found in docs/sigma.md), head-only Laplace,
an ensemble of 5 LoRA members (spread of member Δ), LA-Ens of the same 5 members (`objectives.la_ens`), BNRM,
and Laplace-LoRA over all linear layers (q, k, v and the three dense layers) instead of q, v.

Per arm: accuracy and NLL of its predictive, AUROC of σ_Δ for the MAP's errors, AUROC of −|μ_Δ|/σ_Δ for errors,
OOD AUROC of σ_Δ per shifted set, Spearman(σ_Δ, response length). Resumable: members and posteriors are saved
under --work, predictions cached per arm.

    python experiments/sigma_arms.py    # ~1 h on one core
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bayesrm.config import RMConfig, TrainConfig
from bayesrm.data import Pair, load_pairs
from bayesrm.ensemble import train_ensemble
from bayesrm.io import atomic_write_json, atomic_write_text
from bayesrm.kfac import kron_variance
from bayesrm.laplace import LaplaceConfig, LaplacePosterior, fit_laplace
from bayesrm.metrics import auroc, probit_probability
from bayesrm.model import RewardModel
from bayesrm.objectives import la_ens
from bayesrm.run import RunDir
from bayesrm.train import train

Sets = dict[str, list[Pair]]
Pred = dict[str, tuple[torch.Tensor, torch.Tensor]]  # set name → (μ_Δ, Var(Δ))


def _words(text: str) -> list[str]:
    return text.split()


def shifted_sets(test: list[Pair], seed: int = 0) -> Sets:
    """Synthetic shifts of the test pairs: truncated, word-shuffled and off-prompt responses."""
    rng = random.Random(seed)

    def cut(t: str) -> str:
        w = _words(t)
        return " ".join(w[:max(3, len(w) // 5)])

    def shuffle(t: str) -> str:
        w = _words(t)
        rng.shuffle(w)
        return " ".join(w)

    return {"truncated": [replace(p, chosen=cut(p.chosen), rejected=cut(p.rejected)) for p in test],
            "shuffled": [replace(p, chosen=shuffle(p.chosen), rejected=shuffle(p.rejected)) for p in test],
            "off-prompt": [replace(p, prompt=test[(i + 1) % len(test)].prompt) for i, p in enumerate(test)]}


def laplace_pred(model: RewardModel, post: LaplacePosterior, sets: Sets) -> tuple[Pred, Pred]:
    """(μ_Δ, Var(Δ)) per set, and the same with Var(Δ) / prior Var(Δ) (the relative σ²) from one Jacobian pass."""
    pred, rel = {}, {}
    for name, pairs in sets.items():
        mu, S = post.pair_cache(model, pairs)
        var = sum(kron_variance(S[k], post._grids[k][0], post.tau[k], post.cfg.temperature) for k in post.blocks)
        prior = sum(S[k].square().flatten(1).sum(1) / post.tau[k] for k in post.blocks)  # J_Δ (τI)⁻¹ J_Δᵀ
        var_t = torch.as_tensor(var, dtype=torch.double)
        pred[name] = (mu, var_t)
        rel[name] = (mu, var_t / torch.as_tensor(prior, dtype=torch.double).clamp_min(1e-300))
    return pred, rel


def metrics(name: str, pred: Pred, test_lengths: np.ndarray) -> dict[str, float | str]:
    """The arm's row: predictive accuracy/NLL, error AUROCs, OOD AUROC per shifted set, length correlation."""
    mu, var = pred["test"]
    err = (mu <= 0).numpy()
    sd = var.sqrt().numpy()
    z = np.abs(mu.numpy()) / np.maximum(sd, 1e-12)
    row: dict[str, float | str] = {
        "arm": name, "accuracy": float((mu > 0).double().mean()),
        "nll": float(-torch.log(probit_probability(mu, var).clamp_min(1e-12)).mean()),
        "err_auroc_sigma": auroc(sd[err], sd[~err]), "err_auroc_neg_z": auroc(-z[err], -z[~err]),
        "spearman_sigma_length": float(spearmanr(sd, test_lengths).statistic),
        "spearman_sigma_abs_mu": float(spearmanr(sd, np.abs(mu.numpy())).statistic)}
    for s, (_, v) in pred.items():
        if s != "test":
            row[f"ood_auroc_{s}"] = auroc(v.sqrt().numpy(), sd)
    return row


def cached(path: Path, compute: Callable[[], object]) -> object:
    """`compute()` once, saved atomically at `path` (a rerun reads it)."""
    if path.exists():
        return torch.load(path)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return out


def posterior(member: Path, train_pairs: list[Pair], cfg: LaplaceConfig) -> tuple[RewardModel, LaplacePosterior]:
    """The member and its Laplace posterior (fitted once, saved in the member's run directory)."""
    model = RewardModel.load(member)
    where = RunDir.of(member).posterior_dir if cfg.subset == "lora" else member / "laplace_head"
    if not (where / "posterior.json").exists():
        fit_laplace(model, train_pairs, cfg).save(where)
    return model, LaplacePosterior.load(where, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", default="runs/truncation/v1/proxy", help="the demo proxy (1-member ensemble dir)")
    ap.add_argument("--data", default="runs/truncation/v1/data")
    ap.add_argument("--ood", default="../shared/data/hh-rlhf/harmless-base/test.jsonl.gz")
    ap.add_argument("--n-ood", type=int, default=162)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--work", default="runs/sigma_arms")
    ap.add_argument("--out", default="docs/sigma_arms")
    args = ap.parse_args()
    torch.manual_seed(0)
    data, work = Path(args.data), Path(args.work)
    train_pairs, val = load_pairs(data / "train.jsonl"), load_pairs(data / "val.jsonl")
    test = val[len(val) // 2:]  # half B, as in sigma_study.py
    sets: Sets = {"test": test, "hh-rlhf": load_pairs(args.ood, skip_invalid=True, limit=args.n_ood)}
    sets |= shifted_sets(test)
    lengths = np.array([len(p.chosen) + len(p.rejected) for p in test], dtype=float)
    manifest = json.loads((Path(args.proxy) / "manifest.json").read_text())
    mcfg, tcfg = RMConfig(**manifest["model"]), TrainConfig(**manifest["train"])
    la_cfg = LaplaceConfig()

    ens_dir = work / "ensemble"  # grows the demo's 1-member proxy to M members (member_0 is the demo's)
    if not ens_dir.exists():
        shutil.copytree(args.proxy, ens_dir)
    members = train_ensemble(mcfg, tcfg, train_pairs, ens_dir, members=args.members, resume=True, log=print)
    la_members, rel_members = [], []
    for i, d in enumerate(members):
        model, post = posterior(d, train_pairs, la_cfg)
        la, rel = cached(work / "preds" / f"member_{i}_la.pt", lambda m=model, p=post: laplace_pred(m, p, sets))  # type: ignore[misc]
        la_members.append(la)
        rel_members.append(rel)
    la0, rel0 = la_members[0], rel_members[0]
    model0 = RewardModel.load(members[0])
    rows = []
    rows.append(metrics("Laplace-LoRA (q,v; pair KFAC, marglik τ)", la0, lengths))
    rows.append(metrics("Laplace-LoRA, σ_Δ relative to its prior σ_Δ", rel0, lengths))
    _, head = posterior(members[0], train_pairs, replace(la_cfg, subset="head"))
    rows.append(metrics("head-only Laplace", cached(work / "preds" / "head.pt",  # type: ignore[arg-type]
                                                    lambda: laplace_pred(model0, head, sets)[0]), lengths))
    ens = {s: (torch.stack([p[s][0] for p in la_members]).mean(0),
               torch.stack([p[s][0] for p in la_members]).var(0, correction=0)) for s in sets}
    rows.append(metrics(f"ensemble of {len(members)} (spread of member μ_Δ)", ens, lengths))
    lae = {s: la_ens(torch.stack([p[s][0] for p in la_members]), torch.stack([p[s][1] for p in la_members]))
           for s in sets}
    rows.append(metrics(f"LA-Ens of {len(members)}", lae, lengths))

    bnrm_dir = work / "bnrm"
    if not (bnrm_dir / "model").exists():
        train(RewardModel(replace(mcfg, head="bnrm", bnrm=None)), train_pairs, tcfg, bnrm_dir, resume=True)
    bnrm = RewardModel.load(bnrm_dir)

    def bnrm_pred() -> Pred:
        return {s: tuple(t.double() for t in bnrm.predict_pair_moments(  # type: ignore[misc]
            [p.prompt for p in ps], [p.chosen for p in ps], [p.rejected for p in ps], 16)) for s, ps in sets.items()}
    rows.append(metrics("BNRM (variational head)", cached(work / "preds" / "bnrm.pt", bnrm_pred),  # type: ignore[arg-type]
                        lengths))

    all_dir = work / "lora_all_linear"
    if not (all_dir / "model").exists():
        cfg_all = replace(mcfg, target_modules=["query", "key", "value", "dense"])
        train(RewardModel(cfg_all), train_pairs, tcfg, all_dir, resume=True)
    model_all, post_all = posterior(all_dir, train_pairs, la_cfg)
    rows.append(metrics("Laplace-LoRA over all linear layers", cached(  # type: ignore[arg-type]
        work / "preds" / "la_all.pt", lambda: laplace_pred(model_all, post_all, sets)[0]), lengths))

    err = (la0["test"][0] <= 0).numpy()
    base = auroc(-np.abs(la0["test"][0].numpy())[err], -np.abs(la0["test"][0].numpy())[~err])
    ood = [s for s in sets if s != "test"]
    base_ood = {s: auroc(-np.abs(la0[s][0].numpy()), -np.abs(la0["test"][0].numpy())) for s in ood}
    lines = [f"Test: {len(test)} in-domain pairs (the demo proxy's held-out half B; MAP accuracy "
             f"{float((la0['test'][0] > 0).double().mean()):.3f}); AUROC of −|μ_Δ| for the MAP's errors: {base:.3f}. "
             f"OOD sets: {', '.join(f'{s} ({len(sets[s])})' for s in ood)}. AUROC 0.5 = chance.", "",
             "| arm | acc | NLL | err AUROC σ_Δ | err AUROC −|μ|/σ | " + " | ".join(f"OOD {s}" for s in ood)
             + " | ρ(σ, length) | ρ(σ, |μ|) |", "|---" * (7 + len(ood)) + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['accuracy']:.3f} | {r['nll']:.4f} | {r['err_auroc_sigma']:.3f} | "
                     f"{r['err_auroc_neg_z']:.3f} | " + " | ".join(f"{r[f'ood_auroc_{s}']:.3f}" for s in ood)
                     + f" | {r['spearman_sigma_length']:.2f} | {r['spearman_sigma_abs_mu']:.2f} |")
    lines += ["", "Baseline, the MAP's own −|μ_Δ| as the OOD score: "
              + ", ".join(f"{s} {v:.3f}" for s, v in base_ood.items()) + "."]
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"rows": rows, "baseline_err_auroc_neg_abs_mu": base,
                                                 "baseline_ood_auroc_neg_abs_mu": base_ood,
                                                 "sets": {s: len(v) for s, v in sets.items()}})
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(math.isfinite(float(r["nll"])) for r in rows)


if __name__ == "__main__":
    main()
