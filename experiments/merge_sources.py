"""Merging source-specific reward models (issue 9): ID / OOD accuracy of WARM, task arithmetic, TIES and DARE,
with and without layer-wise task-vector pruning (LwPTV, our saliency) and against random layer masks.

Data (shared only): AlpacaEval judged pairs split by the prompt's source dataset (helpful_base, koala, oasst,
selfinstruct, vicuna) and hh-rlhf harmless-base test ("harmless"). Each source is split prompt-disjointly into
train / eval prompts. One MiniLM LoRA reward model per source (shared init, lora_seed 0) plus extra seeds of one
source (other pairs of the same train prompts and another data order) for WARM. Resumable: trained models, merged
models, score caches and Laplace results on disk are reused.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/merge_sources.py --out runs/merge
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesrm.data import Pair, load_pairs, save_pairs, split_by_prompt
from bayesrm.io import atomic_write_json, atomic_write_text
from bayesrm.laplace import LaplaceConfig, fit_laplace
from bayesrm.merge import MERGE_LOG_NAME, MergeConfig, merge_models, save_merged
from bayesrm.metrics import pair_metrics
from bayesrm.model import RewardModel, RMConfig
from bayesrm.train import TrainConfig, train

CONCLUSIONS = "## Conclusions"
ALPACA_SOURCES = ["helpful_base", "koala", "oasst", "selfinstruct", "vicuna"]
SOURCES = [*ALPACA_SOURCES, "harmless"]
# base methods and their a-priori settings (nothing is tuned, least of all on OOD data)
METHODS: dict[str, dict[str, Any]] = {
    "average": {},  # WARM: uniform weights
    "task_arithmetic": {"lam": 0.5},
    "ties": {"density": 0.2, "lam": 1.0},
    "dare_linear": {"drop_rate": 0.5, "lam": 0.5},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def load_sources(data_dir: Path, args: argparse.Namespace) -> tuple[dict[str, list[Pair]], dict[str, list[Pair]]]:
    """Prompt-disjoint train / eval pairs per source (eval: a fixed random sample of `eval_pairs`)."""
    alpaca = load_pairs(data_dir / "alpaca_eval" / "annotations.jsonl.gz", skip_invalid=True)
    by_src: dict[str, list[Pair]] = {s: [p for p in alpaca if p.source == s] for s in ALPACA_SOURCES}
    by_src["harmless"] = load_pairs(data_dir / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", skip_invalid=True)
    train_parts, evals = {}, {}
    for s, pairs in by_src.items():
        tr, ev = split_by_prompt(pairs, (args.train_frac, 1 - args.train_frac), seed=0)
        train_parts[s] = tr
        evals[s] = [ev[i] for i in sorted(random.Random(0).sample(range(len(ev)), min(args.eval_pairs, len(ev))))]
    return train_parts, evals


def train_sample(part: Sequence[Pair], n: int, seed: int) -> list[Pair]:
    """Training pairs of one model: `n` random pairs of the source's train prompts (another draw per seed)."""
    return [part[i] for i in sorted(random.Random(1000 + seed).sample(range(len(part)), min(n, len(part))))]


# --------------------------------------------------------------------------- models and scores


def train_member(out: Path, source: str, seed: int, pairs: Sequence[Pair], args: argparse.Namespace) -> Path:
    run = out / "models" / f"{source}_s{seed}"
    if (run / "model" / "bayesrm.json").exists():
        return run / "model"
    t0 = time.time()
    mc = RMConfig(max_length=args.max_length, lora_seed=0, extra={"source": source, "seed": seed})
    tc = TrainConfig(epochs=1, lr=args.lr, batch_size=args.batch_size, data_seed=seed, checkpoint_every=0)
    save_pairs(pairs, run / "data" / "train.jsonl")
    train(RewardModel(mc), pairs, tc, run, show_progress=False)
    log(f"trained {source}_s{seed} on {len(pairs)} pairs in {time.time() - t0:.0f} s")
    return run / "model"


class ScoreCache:
    """MAP rewards of every unique (prompt, response) of the eval sets, cached per model on disk."""

    def __init__(self, evals: dict[str, list[Pair]], cache: Path) -> None:
        items: dict[tuple[str, str], int] = {}
        self.idx: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s, pairs in evals.items():
            w = [items.setdefault((p.prompt, p.chosen), len(items)) for p in pairs]
            lo = [items.setdefault((p.prompt, p.rejected), len(items)) for p in pairs]
            self.idx[s] = (np.array(w), np.array(lo))
        self.items = list(items)
        self.fingerprint = hashlib.sha256(json.dumps(self.items).encode()).hexdigest()[:16]
        self.cache = cache

    def rewards(self, name: str, load: Callable[[], RewardModel]) -> np.ndarray:
        path = self.cache / f"{name.replace('/', '__')}.json"
        if path.exists():
            blob = json.loads(path.read_text())
            if blob["fingerprint"] == self.fingerprint:
                return np.array(blob["rewards"])
        t0 = time.time()
        model = load()
        r = model.score([p for p, _ in self.items], [y for _, y in self.items], batch_size=32).numpy()
        atomic_write_json(path, {"fingerprint": self.fingerprint, "rewards": r.tolist()})
        log(f"scored {name} on {len(self.items)} unique responses in {time.time() - t0:.0f} s")
        return r

    def deltas(self, r: np.ndarray) -> dict[str, np.ndarray]:
        return {s: r[w] - r[lo] for s, (w, lo) in self.idx.items()}


def summarise(deltas: dict[str, np.ndarray], id_src: Sequence[str], ood_src: Sequence[str]) -> dict[str, Any]:
    per = {s: pair_metrics(torch.from_numpy(d)) for s, d in deltas.items()}
    row: dict[str, Any] = {"per_source": per}
    for tag, srcs in (("id", id_src), ("ood", ood_src)):
        for k in ("accuracy", "ece", "nll"):
            row[f"{tag}_{k}"] = float(np.mean([per[s][k] for s in srcs]))
    return row


def bootstrap(evals: dict[str, list[Pair]], srcs: Sequence[str], a: dict[str, np.ndarray],
              bs: Sequence[dict[str, np.ndarray]] = (), n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% CI of the macro accuracy of a (or of a − mean of bs, paired) resampling eval prompts within each source."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for s in srcs:
        prompts: dict[str, list[int]] = {}
        for i, p in enumerate(evals[s]):
            prompts.setdefault(p.prompt, []).append(i)
        groups = list(prompts.values())
        ok = (a[s] > 0).astype(float) - (np.mean([b[s] > 0 for b in bs], axis=0) if bs else 0.0)
        sums = np.array([ok[g].sum() for g in groups])
        sizes = np.array([len(g) for g in groups])
        pick = rng.integers(0, len(groups), size=(n_boot, len(groups)))
        draws += sums[pick].sum(1) / sizes[pick].sum(1) / len(srcs)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- experiment


def merge_specs(args: argparse.Namespace) -> list[tuple[str, str, str, MergeConfig]]:
    """(group, method, variant, config): every base method × {none, lwptv (ours), random masks}."""
    specs = []
    for group, methods, n_random in (("multi", list(METHODS), args.random_seeds),
                                     ("warm", ["average"], args.warm_random_seeds)):
        for method in methods:
            base = MergeConfig(method=method, prune_ratio=args.prune_ratio, **METHODS[method])
            specs.append((group, method, "none", base))
            specs.append((group, method, "lwptv", replace(base, lwptv=True)))
            for s in range(n_random):
                specs.append((group, method, f"random{s}", replace(base, lwptv=True, saliency="random", seed=s)))
    return specs


def laplace_eval(name: str, model_dir: Path, fit_pairs: Sequence[Pair], evals: dict[str, list[Pair]],
                 id_src: Sequence[str], ood_src: Sequence[str], out: Path, n_eval: int) -> dict[str, Any]:
    """MAP vs Laplace (σ from a posterior fitted at these weights) on the first `n_eval` eval pairs per source."""
    path = out / "laplace" / f"{name.replace('/', '__')}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    t0 = time.time()
    model = RewardModel.load(model_dir)
    post = fit_laplace(model, fit_pairs, LaplaceConfig(batch_size=8))
    row: dict[str, Any] = {"per_source": {}, "n_fit": len(fit_pairs), "n_eval_per_source": n_eval}
    for s in [*id_src, *ood_src]:
        mu, var = post.predict_pairs(model, evals[s][:n_eval])
        row["per_source"][s] = {"map": pair_metrics(mu), "la": pair_metrics(mu, var),
                                "sigma_delta_mean": float(var.sqrt().mean())}
    for tag, srcs in (("id", id_src), ("ood", ood_src)):
        for kind in ("map", "la"):
            for k in ("accuracy", "ece", "nll"):
                row[f"{tag}_{kind}_{k}"] = float(np.mean([row["per_source"][s][kind][k] for s in srcs]))
        row[f"{tag}_sigma"] = float(np.mean([row["per_source"][s]["sigma_delta_mean"] for s in srcs]))
    row["seconds"] = time.time() - t0
    atomic_write_json(path, row)
    log(f"laplace {name}: fit on {len(fit_pairs)} pairs + eval in {row['seconds']:.0f} s")
    return row


def _loader(model_dir: Path) -> Callable[[], RewardModel]:
    return lambda: RewardModel.load(model_dir)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    t_start = time.time()
    train_parts, evals = load_sources(Path(args.data_dir), args)
    for s, ev in evals.items():
        save_pairs(ev, out / "data" / f"eval_{s}.jsonl")
    id_src = args.id_sources.split(",")
    ood_src = [s for s in SOURCES if s not in id_src]
    groups = {"multi": ([f"{s}_s0" for s in id_src], id_src, ood_src),
              "warm": ([f"{args.warm_source}_s{k}" for k in range(args.warm_seeds)], [args.warm_source],
                       [s for s in SOURCES if s != args.warm_source])}
    # 1. individual reward models (shared init), resumable
    train_sets: dict[str, list[Pair]] = {}
    member_dirs: dict[str, Path] = {}
    for s in SOURCES:
        for seed in range(args.warm_seeds if s == args.warm_source else 1):
            name = f"{s}_s{seed}"
            train_sets[name] = train_sample(train_parts[s], args.train_pairs, seed)
            member_dirs[name] = train_member(out, s, seed, train_sets[name], args)
    # 2. scores of individuals, ensembles and merges on all eval sources
    scorer = ScoreCache(evals, out / "scores")
    rewards = {n: scorer.rewards(n, _loader(d)) for n, d in member_dirs.items()}
    results: dict[str, Any] = {"individual": {}, "groups": {}}
    for n, r in rewards.items():
        results["individual"][n] = {g: summarise(scorer.deltas(r), ids, oods) for g, (_, ids, oods) in groups.items()}
    merged_dirs: dict[str, Path] = {}
    for group, method, variant, cfg in merge_specs(args):
        names, ids, oods = groups[group]
        key = f"{group}/{method}/{variant}"
        mdir = out / "merged" / group / f"{method}-{variant}"
        if not (mdir / MERGE_LOG_NAME).exists():
            model, mlog = merge_models([member_dirs[n] for n in names], cfg)
            save_merged(model, mlog, mdir)
        merged_dirs[key] = mdir
        mlog = json.loads((mdir / MERGE_LOG_NAME).read_text())
        r = scorer.rewards(key, _loader(mdir))
        row = summarise(scorer.deltas(r), ids, oods)
        row |= {"pruned_fraction": mlog.get("pruned_fraction", 0.0), "masks": mlog.get("masks"),
                "max_svd_rel_error": max(mlog["svd_rel_error"].values()), "representation": mlog["representation"],
                "saliency_scores": mlog.get("saliency", {}).get("scores"), "layers": mlog["layers"]}
        results["groups"].setdefault(group, {"members": names, "id": ids, "ood": oods, "merges": {}})
        results["groups"][group]["merges"][f"{method}/{variant}"] = row
        rewards[key] = r
    for group, (names, ids, oods) in groups.items():
        ens = np.mean([rewards[n] for n in names], axis=0)
        results["groups"][group]["ensemble"] = summarise(scorer.deltas(ens), ids, oods)
        rewards[f"{group}/ensemble"] = ens
    # 3. paired bootstrap CIs: LwPTV − none and LwPTV − random, per method
    ci: dict[str, Any] = {}
    for group, g in results["groups"].items():
        for method in {k.split("/")[0] for k in g["merges"]}:
            d = {v.split("/")[1]: scorer.deltas(rewards[f"{group}/{v}"]) for v in g["merges"] if v.startswith(method)}
            rand = [x for v, x in d.items() if v.startswith("random")]
            for tag, srcs in (("id", g["id"]), ("ood", g["ood"])):
                ci[f"{group}/{method}/{tag}/lwptv-none"] = bootstrap(evals, srcs, d["lwptv"], [d["none"]])
                ci[f"{group}/{method}/{tag}/lwptv-random"] = bootstrap(evals, srcs, d["lwptv"], rand)
                ci[f"{group}/{method}/{tag}/none-random"] = bootstrap(evals, srcs, d["none"], rand)
    results["bootstrap_ci95"] = ci
    # 4. Laplace σ for a few models
    results["laplace"] = {}
    per_src_fit = max(1, args.laplace_fit // len(id_src))
    multi_fit = [p for s in id_src for p in train_sets[f"{s}_s0"][:per_src_fit]]
    for key in [k for k in args.laplace_models.split(",") if k]:
        if key in member_dirs:
            mdir, fit = member_dirs[key], train_sets[key][: args.laplace_fit]
        else:
            mdir, fit = merged_dirs[key], multi_fit
        results["laplace"][key] = laplace_eval(key, mdir, fit, evals, id_src, ood_src, out, args.laplace_eval)
    results["config"] = vars(args) | {"methods": METHODS, "sources": SOURCES,
                                      "n_eval": {s: len(v) for s, v in evals.items()},
                                      "n_unique_eval_responses": len(scorer.items)}
    results["seconds"] = time.time() - t_start
    atomic_write_json(out / "results.json", results)
    return results


# --------------------------------------------------------------------------- report


def _f(x: float) -> str:
    return f"{x:.3f}"


def report(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = ["# Merging source-specific reward models (issue 9)", "",
             f"Generated by `experiments/merge_sources.py` ({res['seconds'] / 60:.0f} min on this CPU machine). "
             f"MiniLM-L6 LoRA reward models (r=8, max_length {cfg['max_length']}, 1 epoch, lr {cfg['lr']}, "
             f"batch {cfg['batch_size']}), {cfg['train_pairs']} training pairs per model, "
             f"{cfg['eval_pairs']} prompt-disjoint eval pairs per source ({cfg['n_unique_eval_responses']} unique "
             f"responses). Accuracy = pairwise accuracy; ECE of the MAP BT probability (10 bins). ID / OOD = macro "
             "average over the merge's own / held-out sources. LwPTV = our `rel_norm` saliency "
             f"(‖τ_t^l‖/‖θ0^l‖), pruning round({cfg['prune_ratio']:.2f}·L) of the L = 6 transformer blocks "
             "per model; random = random layer masks of the same sparsity (seeds 0..). Method settings "
             f"(fixed a priori): {json.dumps(cfg['methods'])}.", ""]
    for group, g in res["groups"].items():
        title = ("Multi-source merge" if group == "multi" else f"WARM: {len(g['members'])} seeds of one source")
        lines += [f"## {title}: ID = {', '.join(g['id'])}; OOD = {', '.join(g['ood'])}", "",
                  "| model | ID acc | OOD acc | ID ECE | OOD ECE | pruned | max SVD err |", "|---" * 7 + "|"]
        for n in g["members"]:
            r = res["individual"][n][group]
            lines.append(f"| individual {n} | {_f(r['id_accuracy'])} | {_f(r['ood_accuracy'])} | {_f(r['id_ece'])} | "
                         f"{_f(r['ood_ece'])} | | |")
        e = g["ensemble"]
        lines.append(f"| ensemble (mean reward) | {_f(e['id_accuracy'])} | {_f(e['ood_accuracy'])} | "
                     f"{_f(e['id_ece'])} | {_f(e['ood_ece'])} | | |")
        for key, r in g["merges"].items():
            lines.append(f"| {key} | {_f(r['id_accuracy'])} | {_f(r['ood_accuracy'])} | {_f(r['id_ece'])} | "
                         f"{_f(r['ood_ece'])} | {r['pruned_fraction']:.2f} | {r['max_svd_rel_error']:.2f} |")
        lines += ["", "Paired bootstrap 95% CIs of accuracy differences (resampling eval prompts within each source; "
                  "random = mean over the random-mask seeds):", "",
                  "| method | ID: lwptv − none | OOD: lwptv − none | ID: lwptv − random | OOD: lwptv − random |",
                  "|---|---|---|---|---|"]
        ci = res["bootstrap_ci95"]
        for method in dict.fromkeys(k.split("/")[0] for k in g["merges"]):
            cells = [f"[{ci[f'{group}/{method}/{t}/{c}'][0]:+.3f}, {ci[f'{group}/{method}/{t}/{c}'][1]:+.3f}]"
                     for c in ("lwptv-none", "lwptv-random") for t in ("id", "ood")]
            lines.append(f"| {method} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        lw = g["merges"].get("average/lwptv")
        if lw and lw["masks"]:
            pruned = {n: [lw["layers"][j] for j, m in enumerate(row) if not m]
                      for n, row in zip(g["members"], lw["masks"], strict=True)}
            lines += ["", f"Layers pruned by rel_norm (per model): {json.dumps(pruned)}"]
        lines.append("")
    srcs = list(res["config"]["n_eval"])
    lines += ["## Per-source accuracy", "", "| model | " + " | ".join(srcs) + " |", "|---" * (len(srcs) + 1) + "|"]
    for n, r in res["individual"].items():
        per = r["multi"]["per_source"]
        lines.append(f"| {n} | " + " | ".join(_f(per[s]["accuracy"]) for s in srcs) + " |")
    for group, g in res["groups"].items():
        for key, r in [("ensemble", g["ensemble"]), *g["merges"].items()]:
            if key.endswith(("random1", "random2")):
                continue
            lines.append(f"| {group}/{key} | " + " | ".join(_f(r["per_source"][s]["accuracy"]) for s in srcs) + " |")
    if res["laplace"]:
        n_fit = next(iter(res["laplace"].values()))["n_fit"]
        lines += ["", f"## Laplace σ (posterior fitted at each model's weights on ≤{n_fit} of its ID training pairs; "
                  f"first {cfg['laplace_eval']} eval pairs per source)", "",
                  "| model | ID acc | OOD acc | ID ECE MAP | ID ECE LA | OOD ECE MAP | OOD ECE LA | OOD NLL MAP | "
                  "OOD NLL LA | mean σ_Δ ID | mean σ_Δ OOD |", "|---" * 11 + "|"]
        for key, r in res["laplace"].items():
            lines.append(f"| {key} | {_f(r['id_map_accuracy'])} | {_f(r['ood_map_accuracy'])} | "
                         f"{_f(r['id_map_ece'])} | {_f(r['id_la_ece'])} | {_f(r['ood_map_ece'])} | "
                         f"{_f(r['ood_la_ece'])} | {_f(r['ood_map_nll'])} | {_f(r['ood_la_nll'])} | "
                         f"{_f(r['id_sigma'])} | {_f(r['ood_sigma'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="runs/merge", help="output directory (resumable)")
    ap.add_argument("--doc", default="docs/merge_results.md", help="markdown report ('' to skip)")
    ap.add_argument("--id-sources", default="helpful_base,koala,oasst,harmless", help="sources merged (ID)")
    ap.add_argument("--warm-source", default="oasst")
    ap.add_argument("--warm-seeds", type=int, default=3, help="models of the WARM source (seed 0 is shared)")
    ap.add_argument("--train-pairs", type=int, default=300)
    ap.add_argument("--eval-pairs", type=int, default=60, help="eval pairs per source")
    ap.add_argument("--train-frac", type=float, default=0.7, help="fraction of each source's prompts for training")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prune-ratio", type=float, default=1 / 3, help="LwPTV: fraction of layers pruned per model")
    ap.add_argument("--random-seeds", type=int, default=2, help="random-mask baselines per multi-source method")
    ap.add_argument("--warm-random-seeds", type=int, default=1, help="random-mask baselines for WARM")
    ap.add_argument("--laplace-models", default="multi/average/none,multi/average/lwptv,multi/ties/none,"
                                                "multi/ties/lwptv", help="comma-separated ('' for none)")
    ap.add_argument("--laplace-fit", type=int, default=48, help="pairs the posterior is fitted on")
    ap.add_argument("--laplace-eval", type=int, default=20, help="eval pairs per source for Laplace metrics")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = run(args)
    if args.doc:  # a hand-written "## Conclusions" section of an existing report is kept
        old = Path(args.doc).read_text() if Path(args.doc).exists() else ""
        kept = old[old.index(CONCLUSIONS):] if CONCLUSIONS in old else ""
        atomic_write_text(args.doc, report(res) + ("\n" + kept if kept else ""))
        atomic_write_json(Path(args.doc).with_suffix(".json"), res)
    log(f"done in {res['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
