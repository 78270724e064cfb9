"""`bayesrm heads` (frozen-backbone fast path) and `bayesrm select` (active labelling), registered on the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bayesrm.cli import FieldOpt, FormatOpt, SkipOpt, _friendly, _load, _print_metrics, app, console
from bayesrm.config import HeadConfig, HeadKind, LaplaceParams, SelectBy
from bayesrm.data import DataFormat, save_pairs, split_by_prompt

_H = HeadConfig()
CACHE_DIR = Path(".cache/features")


@app.command("heads")
@_friendly
def heads_cmd(
    data: Annotated[str, typer.Argument(help="training pairs (any format `train` reads)")],
    out: Annotated[Path, typer.Option(help="heads directory (heads.safetensors, heads.json, laplace/)")] = Path(
        "runs/heads"),
    eval_data: Annotated[str | None, typer.Option(help="evaluation pairs; default: a prompt-disjoint split")] = None,
    eval_frac: float = 0.1,
    split_seed: int = 0,
    backbone: str = "all-MiniLM-L6-v2",
    template: Annotated[str, typer.Option(help="oasst | chat | plain")] = "oasst",
    max_length: int = 500,
    kind: Annotated[str, typer.Option(help=" | ".join(k.value for k in HeadKind))] = _H.kind,
    hidden: Annotated[int, typer.Option(help="MLP width")] = _H.hidden,
    members: Annotated[int, typer.Option(help="ensemble size M (vectorised)")] = _H.members,
    epochs: int = _H.epochs,
    lr: float = _H.lr,
    batch_size: int = _H.batch_size,
    l2: Annotated[float, typer.Option(help="Gaussian prior (l2/2)‖θ‖² on the head (MAP)")] = _H.l2,
    seed: int = _H.seed,
    laplace: Annotated[bool, typer.Option(help="head-only Laplace, exact GGN, marglik τ (M = 1 only)")] = True,
    laplace_params: Annotated[str, typer.Option(help="last (last layer) | all (small MLP)")] = (
        LaplaceParams.LAST.value),
    cache_dir: Annotated[Path, typer.Option(help="feature cache (keyed by weights, template, data)")] = CACHE_DIR,
    feature_batch_size: int = 32,
    limit: int | None = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Fast path: backbone features once (cached), then linear/MLP heads, ensembles and head Laplace in seconds."""
    import time

    import torch

    from bayesrm.data import pairs_fingerprint
    from bayesrm.feature_heads import (
        BACKBONE_KEY,
        STANDARDIZATION_KEY,
        fit_head_laplace,
        predict_pairs,
        save_heads,
        train_heads,
    )
    from bayesrm.features import pair_features, weights_fingerprint
    from bayesrm.metrics import pair_metrics
    from bayesrm.model import RewardModel, RMConfig

    cfg = HeadConfig(kind=kind, hidden=hidden, members=members, epochs=epochs, lr=lr, batch_size=batch_size, l2=l2,
                     seed=seed)
    if laplace and members > 1:
        raise ValueError("--laplace fits one head; with --members > 1 σ is the ensemble spread (pass --no-laplace)")
    pairs = _load(data, format, field, skip_invalid, limit)
    if eval_data:
        train_pairs, eval_pairs = pairs, _load(eval_data, format, field, skip_invalid)
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, (1 - eval_frac, eval_frac), split_seed)
    mc = RMConfig(backbone=backbone, template=template, max_length=max_length, freeze_backbone=True,
                  extra={"train_data": data, "eval_data": eval_data, "split_seed": split_seed})
    model = RewardModel(mc)
    t0 = time.perf_counter()
    feats = pair_features(model, train_pairs, cache_dir, feature_batch_size, log=console.print)
    t1 = time.perf_counter()
    stack = train_heads(feats, cfg, log=console.print)
    post = fit_head_laplace(stack, feats, which=laplace_params) if laplace else None
    t2 = time.perf_counter()
    info: dict[str, Any] = {"n_train": len(train_pairs), "data_sha256": pairs_fingerprint(train_pairs),
                            "features": feats.fingerprint, BACKBONE_KEY: weights_fingerprint(model),
                            STANDARDIZATION_KEY: stack.reward_statistics(torch.cat([feats.chosen, feats.rejected])),
                            "seconds_features": t1 - t0, "seconds_heads": t2 - t1}
    if eval_pairs:
        ef = pair_features(model, eval_pairs, cache_dir, feature_batch_size, log=console.print)
        mu, var = predict_pairs(stack, ef, post, laplace_params)
        info["eval"] = {f"map_{k}": v for k, v in pair_metrics(mu).items()} | {
            f"bayes_{k}": v for k, v in pair_metrics(mu, var).items()}
        _print_metrics("held-out pairs (map: mean reward; bayes: probit predictive with Var Δ)", info["eval"])
    save_heads(out, stack, mc.to_dict(), post, info, laplace_params)
    save_pairs(train_pairs, out / "data" / "train.jsonl")  # the exact split, as `train` keeps it
    save_pairs(eval_pairs, out / "data" / "eval.jsonl")
    tau = f", τ = {next(iter(post.tau.values())):.4g} (marglik)" if post is not None else ""
    console.print(f"heads saved to {out} (features {t1 - t0:.1f} s, heads {t2 - t1:.1f} s{tau})")


@app.command("select")
@_friendly
def select_cmd(
    model_dir: Annotated[Path, typer.Argument(help="fast heads (`bayesrm heads`), or a model with a Laplace "
                                                   "posterior or a BNRM head")],
    unlabelled: Annotated[str, typer.Argument(help="pairs to rank; chosen/rejected are just the two responses "
                                                   "(map other columns with --field chosen=COL)")],
    k: Annotated[int, typer.Option(help="how many pairs to select")] = 100,
    by: Annotated[str, typer.Option(help="bald (expected information) | sigma (σ_Δ) | random")] = (
        SelectBy.BALD.value),
    out: Annotated[Path, typer.Option(help="jsonl of the selected pairs, best first")] = Path("selected.jsonl"),
    seed: Annotated[int, typer.Option(help="random order for --by random")] = 0,
    cache_dir: Annotated[Path, typer.Option(help="feature cache for fast heads")] = CACHE_DIR,
    batch_size: int = 16,
    limit: int | None = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Rank unlabelled pairs by BALD (label–parameter mutual information), by σ_Δ, or at random; write the top K."""
    from bayesrm.active import acquisition_scores, bald_bt, pair_moments
    from bayesrm.io import write_jsonl

    how = SelectBy(by)
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    pairs = _load(unlabelled, format, field, skip_invalid, limit)
    mu, var = pair_moments(model_dir, pairs, cache_dir, batch_size)
    score = acquisition_scores(mu, var, how, seed)
    bald = bald_bt(mu, var)
    order = sorted(range(len(pairs)), key=lambda i: (-float(score[i]), i))[:k]
    rows = [pairs[i].to_dict() | {"rank": r + 1, "by": how.value, "score": float(score[i]),
                                  "mu_delta": float(mu[i]), "sigma_delta": float(var[i].clamp_min(0).sqrt()),
                                  "bald": float(bald[i])} for r, i in enumerate(order)]
    write_jsonl(out, rows)
    console.print(f"wrote the top {len(rows)} of {len(pairs)} pairs by {how.value} to {out}")
