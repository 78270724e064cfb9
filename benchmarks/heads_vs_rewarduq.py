"""Frozen-backbone fast path (cached features → heads) vs RewardUQ's MLP-head ensemble vs `train --freeze-backbone`.

    PYTHONPATH=src .venv/bin/python benchmarks/heads_vs_rewarduq.py              # ~6 min CPU, first run
    PYTHONPATH=src .venv/bin/python benchmarks/heads_vs_rewarduq.py --reuse-old  # heads only, old-path row kept

Same data for every row: 600 training / 200 test AlpacaEval judged pairs on disjoint prompts
(`experiments/judged_pairs.py`), the embedded all-MiniLM-L6-v2 frozen, OASST template, max_length 256. The features
are computed once by `bayesrm.features.pair_features` (cached under `--cache-dir`; the first run pays the backbone
pass, later runs hit the cache) and every head row, RewardUQ's included, trains on those same tensors:

- bayesrm rows: `feature_heads.train_heads` (Adam, batch 64) and `fit_head_laplace` (exact GGN, marglik τ). For
  each head kind, l2 ∈ {1e-3, 1e-2, 1e-1} × epochs ∈ {10, 50} is chosen by NLL on 200 further pool pairs (never the
  test pairs); the ensemble uses the MLP's choice. The ensemble is one vectorised HeadStack; "loop" trains the same
  20 members one after another (the same weights, tested in tests/test_feature_heads.py): what vectorising buys.
- RewardUQ 0.1.0: `MLPHeadEnsembleTrainer` with its defaults (20 heads of 2 hidden layers × 128, xavier init,
  regularisation towards the initial weights 0.5, TRL RewardConfig's learning rate, batch 8), 10 epochs, fed our
  features through its `precomputed_features_train`; run in the benchmark venv by `rewarduq_heads.py`
  (requirements-rewarduq.txt). Test rewards come back per member and are scored by the same code as ours.
- `train --freeze-backbone`: one epoch of `bayesrm.train.train` with a frozen backbone (batch 8), which re-runs the
  backbone on every batch; only its time is measured (it learns the same kind of linear head).

Metrics on the 200 test pairs: accuracy, NLL and ECE (`bayesrm.metrics.pair_metrics`); "MAP" uses σ(μ_Δ) with μ_Δ the
(member-mean) reward difference, "Bayes" the probit predictive with Var Δ (Laplace J_Δ Σ J_Δᵀ, or the members' spread
for ensembles). Times are training wall and process-CPU seconds with 1 torch thread (features excluded: reported
once); the machine is shared, so CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from judged_pairs import judged_split  # noqa: E402

from bayesrm.config import HeadConfig  # noqa: E402
from bayesrm.feature_heads import fit_head_laplace, predict_pairs, train_heads  # noqa: E402
from bayesrm.features import PairFeatures, pair_features  # noqa: E402
from bayesrm.io import atomic_write_json  # noqa: E402
from bayesrm.metrics import pair_metrics  # noqa: E402
from bayesrm.model import RewardModel, RMConfig, resolve_backbone  # noqa: E402


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, CPU s) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def metrics(mu: torch.Tensor, var: torch.Tensor | None) -> dict[str, float]:
    row = {f"map_{k}": v for k, v in pair_metrics(mu).items() if k != "n"}
    if var is not None:
        row |= {f"bayes_{k}": v for k, v in pair_metrics(mu, var).items() if k != "n"}
    return row


L2S, EPOCHS = (1e-3, 1e-2, 1e-1), (10, 50)  # the validation sweep of each head kind


def select_config(kind: str, train: PairFeatures, val: PairFeatures) -> tuple[HeadConfig, list[dict[str, Any]]]:
    """The (l2, epochs) of a single `kind` head with the lowest validation NLL, and the sweep."""
    sweep: list[dict[str, Any]] = []
    for l2 in L2S:
        for epochs in EPOCHS:
            cfg = HeadConfig(kind=kind, hidden=128, l2=l2, epochs=epochs)
            mu, _ = predict_pairs(train_heads(train, cfg), val)
            sweep.append({"kind": kind, "l2": l2, "epochs": epochs, "val_nll": pair_metrics(mu)["nll"]})
    best = min(sweep, key=lambda r: r["val_nll"])
    return HeadConfig(kind=kind, hidden=128, l2=best["l2"], epochs=best["epochs"]), sweep


def ours(train: PairFeatures, val: PairFeatures, test: PairFeatures) -> tuple[list[dict[str, Any]], list[Any]]:
    rows, sweeps = [], []
    lin, s1 = select_config("linear", train, val)
    mlp, s2 = select_config("mlp", train, val)
    sweeps += s1 + s2
    ens = HeadConfig(**{**mlp.__dict__, "members": 20})
    for name, cfg, laplace in (("linear", lin, True), ("MLP 128", mlp, True), ("ensemble M=20 MLP 128", ens, False)):
        stack, wall, cpu = timed(functools.partial(train_heads, train, cfg))
        mu, var = predict_pairs(stack, test)
        base = {"method": f"bayesrm {name} (l2 {cfg.l2:g})", "epochs": cfg.epochs}
        rows.append(base | {"wall_s": wall, "cpu_s": cpu} | metrics(mu, var if cfg.members > 1 else None))
        if laplace:
            post, lw, lc = timed(functools.partial(fit_head_laplace, stack, train))
            mu, var = predict_pairs(stack, test, post)
            rows.append(base | {"method": f"{base['method']} + head Laplace (last layer, marglik τ)",
                                "wall_s": wall + lw, "cpu_s": cpu + lc, "laplace_s": lw, "tau": post.tau["head"]}
                        | metrics(mu, var))
    _, wall, cpu = timed(lambda: [train_heads(train, HeadConfig(**{**mlp.__dict__, "seed": i})) for i in range(20)])
    rows.append({"method": "bayesrm ensemble M=20 MLP 128, Python loop over members", "epochs": mlp.epochs,
                 "wall_s": wall, "cpu_s": cpu})
    return rows, sweeps


def rewarduq(train: PairFeatures, test: PairFeatures, python: str, epochs: float) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    if not Path(python).exists():
        return {"method": "RewardUQ 0.1.0", "error": f"benchmark venv {python} not found"}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file({"train_chosen": train.chosen, "train_rejected": train.rejected, "test_chosen": test.chosen,
                   "test_rejected": test.rejected}, str(inp))
        cmd = [python, str(ROOT / "benchmarks" / "rewarduq_heads.py"), str(inp), str(out), "--backbone",
               resolve_backbone("all-MiniLM-L6-v2"), "--epochs", str(epochs)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            return {"method": "RewardUQ 0.1.0", "error": res.stderr.strip().splitlines()[-1]}
        t = load_file(str(out))
    deltas = (t["chosen"] - t["rejected"]).double()  # (M, N)
    wall, cpu = t["seconds"].tolist()
    return {"method": "RewardUQ 0.1.0 MLPHeadEnsemble M=20 (2×128)", "epochs": epochs, "wall_s": wall, "cpu_s": cpu,
            "lr": float(t["lr"][0])} | metrics(deltas.mean(0), deltas.var(0, correction=0))


def old_path(model_cfg: RMConfig, pairs: list[Any]) -> dict[str, Any]:
    from bayesrm.train import TrainConfig, train

    model = RewardModel(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        _, wall, cpu = timed(lambda: train(model, pairs, TrainConfig(epochs=1, batch_size=8, checkpoint_every=0), tmp,
                                           show_progress=False))
    return {"method": "bayesrm train --freeze-backbone (re-runs the backbone)", "epochs": 1, "wall_s": wall,
            "cpu_s": cpu}


def table(rows: list[dict[str, Any]], base_cpu: float) -> str:
    cols = ["method", "epochs", "wall_s", "cpu_s", "cpu_s_per_epoch", "x_vs_old_epoch", "map_accuracy", "map_nll",
            "map_ece", "bayes_accuracy", "bayes_nll", "bayes_ece"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = dict(r)
        if "cpu_s" in r:
            r["cpu_s_per_epoch"] = r["cpu_s"] / r["epochs"]
            r["x_vs_old_epoch"] = base_cpu / r["cpu_s_per_epoch"]
        if "error" in r:
            r["method"] = f"{r['method']}: {r['error']}"
        out.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                     for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-pool", type=int, default=1200, help="pool built (and cached) for active_labelling.py")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "features"))
    ap.add_argument("--bench-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    ap.add_argument("--rewarduq-epochs", type=float, default=10)
    ap.add_argument("--n-val", type=int, default=200, help="pool pairs after the training ones, to choose l2/epochs")
    ap.add_argument("--skip-old", action="store_true", help="do not time `train --freeze-backbone`")
    ap.add_argument("--reuse-old", action="store_true", help="take the `train --freeze-backbone` row from --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heads_vs_rewarduq.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    pool, test = judged_split(args.n_pool, args.n_test)
    cfg = RMConfig(max_length=args.max_length, freeze_backbone=True)
    model = RewardModel(cfg)
    (fp, ft), fwall, fcpu = timed(lambda: (pair_features(model, pool, args.cache_dir, log=print),
                                           pair_features(model, test, args.cache_dir, log=print)))
    print(f"features: {2 * (len(pool) + len(test))} responses, {fwall:.1f} s wall, {fcpu:.1f} s CPU")
    train, val = fp.subset(range(args.n_train)), fp.subset(range(args.n_train, args.n_train + args.n_val))
    rows, sweeps = ours(train, val, ft)
    rows.append(rewarduq(train, ft, args.bench_python, args.rewarduq_epochs))
    if args.reuse_old:
        prev = json.loads(Path(args.out).read_text())["rows"]
        rows.append(next(r for r in prev if r["method"].startswith("bayesrm train")) | {"reused": True})
    elif not args.skip_old:
        rows.append(old_path(cfg, pool[: args.n_train]))
    base = next((r["cpu_s"] for r in rows if r["method"].startswith("bayesrm train")), float("nan"))
    md = table(rows, base)
    print(md)
    atomic_write_json(args.out, {"n_train": args.n_train, "n_test": args.n_test, "max_length": args.max_length,
                                 "features": {"wall_s": fwall, "cpu_s": fcpu, "responses": 2 * (len(pool) + len(test)),
                                              "pool_fingerprint": fp.fingerprint, "test_fingerprint": ft.fingerprint},
                                 "rows": rows, "sweep": sweeps, "table": md})
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
