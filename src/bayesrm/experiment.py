"""Best-of-n overoptimisation experiment (Gao et al. 2022; Coste et al. 2024; Yang et al. 2024 §5).

Gold-labelled proxy training on one set of prompts, Laplace-LoRA per proxy member, scores cached once per
model on a disjoint set of evaluation prompts, then the unbiased BoN estimator for every selection reward.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesrm import config_file
from bayesrm.bon import BonCurve, bon_curve, default_ns
from bayesrm.data import Pair, save_pairs, split_prompts
from bayesrm.ensemble import save_standardization, train_ensemble
from bayesrm.gold import RewardModelGold, label_pairs_from_gold
from bayesrm.io import atomic_path, atomic_write_json, atomic_write_text
from bayesrm.laplace import LaplaceConfig, LaplacePosterior, fit_laplace
from bayesrm.metrics import pair_metrics
from bayesrm.model import RewardModel, RMConfig
from bayesrm.objectives import parse_spec, reference_stats, standardize, standardize_var
from bayesrm.pool import NULL_MODELS, Pool, alpaca_eval_pool, load_pool
from bayesrm.progress import progress_bar
from bayesrm.run import RunDir
from bayesrm.train import TrainConfig, reward_deltas


@dataclass
class BonConfig:
    """A BoN overoptimisation experiment; `bayesrm bon CONFIG` reads it from TOML or JSON."""

    pool: str = "alpaca_eval"  # "alpaca_eval" (bundled judged pool) or a jsonl with prompt/response/gold
    data_dir: str = "../shared/data"  # where alpaca_eval/annotations.jsonl.gz lives
    gold: str = "pool"  # "pool": the pool's own gold column (judged data); else a reward model (bayesrm dir or HF id)
    exclude_generators: list[str] = field(default_factory=lambda: list(NULL_MODELS))  # alpaca_eval: judge exploits
    seed: int = 0  # prompt split, pair sampling and label noise
    train_frac: float = 0.5  # fraction of prompts for proxy training (rest: validation + BoN evaluation)
    val_frac: float = 0.1  # fraction of prompts for validation pairs (τ grid, calibration)
    train_prompts: int | None = None  # cap on training prompts (None: all in the split)
    eval_prompts: int | None = None  # cap on BoN evaluation prompts
    pairs_per_prompt: int = 8  # gold-labelled pairs per training prompt (size knob)
    label_noise: float = 0.25  # fraction of flipped training labels (Coste et al. 2024)
    noise_mode: str = "flip"  # flip | randomize
    members: int = 1  # proxy RMs with different LoRA-init and data-order seeds (>1 enables ens/la-ens)
    methods: list[str] = field(default_factory=lambda: ["map", "la:std:k=1", "la:var:k=1"])
    k_sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    calib_pairs: int = 1000  # validation pairs used for the MAP vs Laplace calibration table
    score_batch_size: int = 16
    n_boot: int = 1000
    model: RMConfig = field(default_factory=RMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> BonConfig:
    """Read a BonConfig from .toml or .json plus `--set KEY=VALUE` overrides; unknown or mistyped fields fail."""
    cfg = config_file.load_config(BonConfig, path, overrides)
    for m in cfg.methods:
        parse_spec(m)  # fail early on a bad method spec
    return cfg


def split_pool(pool: Pool, cfg: BonConfig) -> tuple[list[int], list[int], list[int]]:
    """Prompt-disjoint (train, val, eval) prompt indices into the pool."""
    parts = split_prompts(pool.prompts, (cfg.train_frac, cfg.val_frac, 1.0 - cfg.train_frac - cfg.val_frac),
                          cfg.seed)
    idx = [sorted(i for i, p in enumerate(pool.prompts) if p in part) for part in parts]
    tr, va, ev = idx
    if cfg.train_prompts is not None:
        tr = tr[: cfg.train_prompts]
    if cfg.eval_prompts is not None:
        ev = ev[: cfg.eval_prompts]
    if not tr or not ev:
        raise ValueError("the split left no training or no evaluation prompts; adjust train_frac/val_frac")
    return tr, va, ev


def _cached_scores(path: Path, compute: Any, prompts: Sequence[str], responses: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """Scores of the evaluation candidates, computed once; a cache written for other candidates is recomputed."""
    h = hashlib.sha256()
    for p, r in zip(prompts, responses, strict=True):
        h.update(json.dumps([p, r]).encode())
    key = h.hexdigest()
    if path.exists():
        with np.load(path) as z:
            cached = {k: z[k] for k in z.files}
        if str(cached.pop("candidates_sha256", "")) == key:
            return cached
    out = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out, candidates_sha256=np.array(key))
    return dict(out)


def run_bon(cfg: BonConfig, out_dir: str | Path, log: Any = print) -> dict[str, Any]:
    """Run (or resume) the whole experiment; writes results.json, results.md, bon.png, k_sweep.png."""
    from bayesrm.plots import plot_bon, plot_k_sweep

    out = Path(out_dir)
    if (out / "proxy" / "manifest.json").exists():
        log(f"resuming from {out}: finished proxy members, posteriors and cached scores are reused")
    else:
        log(f"starting fresh: no checkpoint in {out}")
    gold_model = RewardModelGold(cfg.gold) if cfg.gold != "pool" else None  # a missing gold model fails first
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    t0 = time.time()
    if cfg.pool == "alpaca_eval":
        pool = alpaca_eval_pool(cfg.data_dir, exclude_generators=cfg.exclude_generators)
    else:
        pool = load_pool(cfg.pool)
    if gold_model is not None:
        log(f"scoring the pool with the gold reward model {cfg.gold}")
        pool.gold = pool.unflatten(gold_model(*pool.flat()))
        pool.meta["gold"] = cfg.gold
    if pool.gold is None:
        raise ValueError(f"pool {cfg.pool} has no gold rewards: set gold to a reward model (bayesrm dir or HF id)")
    tr, va, ev = split_pool(pool, cfg)
    train_pairs = label_pairs_from_gold(pool.subset(tr), cfg.pairs_per_prompt, cfg.label_noise, cfg.noise_mode,
                                        cfg.seed)
    val_pairs = label_pairs_from_gold(pool.subset(va), cfg.pairs_per_prompt, 0.0, seed=cfg.seed + 1)
    eval_pool = pool.subset(ev)
    save_pairs(train_pairs, out / "data" / "train.jsonl")  # the gold-labelled (noisy) proxy training pairs
    save_pairs(val_pairs, out / "data" / "val.jsonl")
    eval_pool.save_jsonl(out / "data" / "eval_pool.jsonl")
    log(f"pool: {len(pool)} prompts ({pool.meta.get('policy', 'pool')}); train {len(tr)} prompts / "
        f"{len(train_pairs)} pairs (noise {cfg.label_noise}), val {len(va)} prompts / {len(val_pairs)} pairs, "
        f"BoN eval {len(ev)} prompts × ~{int(np.mean(eval_pool.sizes()))} candidates")
    prompts, responses = eval_pool.flat()
    means, variances, member_info = [], [], []
    calib: dict[str, dict[str, float]] = {}
    member_dirs = train_ensemble(cfg.model, cfg.train, train_pairs, out / "proxy", members=cfg.members,
                                 eval_pairs=val_pairs, log=log, standardize_on_train=False)  # resumable
    for i, mdir in enumerate(member_dirs):
        model = RewardModel.load(mdir)
        run = RunDir.of(mdir)
        lcfg = cfg.laplace.for_training(asdict(cfg.train))
        found = run.find_posterior()
        post = LaplacePosterior.load(found, model) if found is not None else None  # checked against the model
        if post is not None and asdict(post.cfg) != asdict(lcfg):
            log(f"member {i}: the posterior in {run.posterior_dir} was fitted with other laplace settings; refitting")
            post = None
            (mdir / "eval_scores.npz").unlink(missing_ok=True)
        if post is None:
            log(f"member {i}: fitting Laplace-LoRA on {len(train_pairs)} pairs")
            with progress_bar("laplace fit (pairs)", len(train_pairs)) as advance:
                post = fit_laplace(model, train_pairs, lcfg, val_pairs=val_pairs,
                                   progress=advance)
            post.save(run.posterior_dir)
        taus = sorted(post.tau.values())
        member_info.append({"member": i, "lora_seed": model.config.lora_seed,
                            "data_seed": model.config.extra.get("data_seed"),
                            "tau_min": taus[0], "tau_median": taus[len(taus) // 2], "tau_max": taus[-1],
                            "log_marglik": post.log_marginal_likelihood()})
        if val_pairs:
            calib[f"member_{i}"] = pair_eval(model, val_pairs[: cfg.calib_pairs], post)

        def compute(model: RewardModel = model, post: LaplacePosterior = post) -> dict[str, np.ndarray]:
            with progress_bar("scoring candidates (mean + σ²)", len(responses)) as advance:
                m, v = post.predict(model, prompts, responses, cfg.score_batch_size, progress=advance)
            return {"mean": m.numpy(), "var": v.numpy()}

        sc = _cached_scores(mdir / "eval_scores.npz", compute, prompts, responses)
        means.append(sc["mean"])
        variances.append(sc["var"])
    M = torch.as_tensor(np.stack(means))  # (members, N)
    V = torch.as_tensor(np.stack(variances))  # (members, N)
    # BT rewards are defined up to a shift (and each member has its own scale): ensemble specs see members
    # standardised on the evaluation pool, the reference policy's samples, with σ scaled alike (note §8). The
    # statistics go into the ensemble's manifest, so `score`/`serve`/TRL on out/proxy give these same numbers.
    ref_mean, ref_std = reference_stats(M)
    if cfg.members > 1:
        save_standardization(out / "proxy", ref_mean.tolist(), ref_std.tolist(),
                             source=f"BoN evaluation pool ({M.shape[1]} reference-policy samples)")
    M_std, V_std = standardize(M, ref_mean, ref_std), standardize_var(V, ref_std)
    gold = eval_pool.gold
    assert gold is not None
    ns = default_ns(min(eval_pool.sizes()))
    methods = list(cfg.methods)
    if cfg.members > 1:
        methods += [m for m in ("ens:mean", "ens:wco", "ens:uwo:lambda=0.5", "la-ens:var:k=1")
                    if m not in methods]
    curves: list[BonCurve] = []
    for name in methods:
        spec = parse_spec(name)
        sel = spec.apply(M_std, V_std) if spec.needs_ensemble else spec.apply(M[:1], V[:1])
        per_prompt = eval_pool.unflatten(sel.tolist())
        curves.append(bon_curve(name, per_prompt, per_prompt, gold, ns, n_boot=cfg.n_boot, seed=cfg.seed))
    sweep: dict[str, dict[float, float]] = {"std": {}, "var": {}}
    map_gold = eval_pool.unflatten(M[0].tolist())
    for pen in ("std", "var"):
        for k in cfg.k_sweep:
            sel = parse_spec(f"la:{pen}:k={k}").apply(M[:1], V[:1])
            c = bon_curve(f"la:{pen}:k={k}", eval_pool.unflatten(sel.tolist()), map_gold, gold, [ns[-1]], n_boot=10)
            sweep[pen][float(k)] = float(c.gold[-1])
    corr = _within_prompt_corr(eval_pool.unflatten(M[0].tolist()), gold)
    results = {
        "config": asdict(cfg), "n_train_pairs": len(train_pairs), "n_val_pairs": len(val_pairs),
        "n_eval_prompts": len(ev), "pool": pool.meta, "members": member_info, "calibration_val": calib,
        "proxy_gold_within_prompt_spearman": corr, "curves": [c.to_dict() for c in curves],
        "k_sweep_gold_at_max_n": sweep, "seconds": time.time() - t0,
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_table(curves, corr))
    plot_bon(curves, out / "bon.png", f"Best-of-n on {len(ev)} held-out prompts (gold: {cfg.pool})")
    plot_k_sweep(sweep, out / "k_sweep.png", f"Penalty weight k: gold at n={ns[-1]}")
    return results


def _within_prompt_corr(proxy: list[list[float]], gold: list[list[float]]) -> float | None:
    """Mean over prompts of the Spearman correlation between proxy and gold within a pool (note §8)."""
    from scipy.stats import spearmanr

    vals = []
    for p, g in zip(proxy, gold, strict=True):
        if np.std(p) > 0 and np.std(g) > 0:
            vals.append(float(spearmanr(p, g).statistic))
    return float(np.mean(vals)) if vals else None  # undefined: no pool with spread in both


def results_table(curves: list[BonCurve], corr: float | None) -> str:
    """Markdown table: gold at n=1, at the largest n, and the best gold with its KL, per method."""
    lines = ["| method | gold n=1 | gold n=max (KL) | best gold (KL) | proxy n=max |", "|---|---|---|---|---|"]
    for c in curves:
        b = int(np.argmax(c.gold))
        lines.append(f"| {c.name} | {c.gold[0]:.4f} | {c.gold[-1]:.4f} ± {(c.gold_hi[-1] - c.gold_lo[-1]) / 2:.4f} "
                     f"({c.kl[-1]:.2f}) | {c.gold[b]:.4f} ({c.kl[b]:.2f}) | {c.proxy[-1]:.3f} |")
    lines.append("")
    lines.append("Within-prompt Spearman(proxy MAP, gold) on the evaluation pools: "
                 + ("n/a" if corr is None else f"{corr:.3f}"))
    return "\n".join(lines) + "\n"


def pair_eval(model: RewardModel, pairs: Sequence[Pair], post: LaplacePosterior | None = None) -> dict[str, float]:
    """Accuracy/NLL/ECE for MAP, and for the Laplace probit predictive when a posterior is given."""
    if post is None:
        return pair_metrics(reward_deltas(model, pairs))
    mu, var = post.predict_pairs(model, pairs)
    return {f"map_{k}": v for k, v in pair_metrics(mu).items()} | {
        f"la_{k}": v for k, v in pair_metrics(mu, var).items()}


def demo_config(data_dir: str = "../shared/data", members: int = 1) -> BonConfig:
    """The `make demo` experiment, sized to finish on 2 CPU cores in about ten minutes."""
    return BonConfig(
        data_dir=data_dir, train_prompts=300, eval_prompts=30, pairs_per_prompt=4, label_noise=0.25,
        members=members, n_boot=1000, calib_pairs=160,
        model=RMConfig(max_length=192),
        train=TrainConfig(epochs=1, lr=3e-4, batch_size=8, checkpoint_every=50),
        laplace=LaplaceConfig(batch_size=8),
    )
