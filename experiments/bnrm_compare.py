"""BT vs BNRM on the same MiniLM backbone, data and settings (issue 8); resumable, outputs under runs/bnrm/.

Stages, each reused when its output exists:
  1. data: the AlpacaEval split of runs/alpaca (972 train / 228 eval pairs, prompt-disjoint), a copy with a seeded
     25% of train labels flipped, and a fixed random 400 pairs of hh-rlhf harmless-base test (shifted set);
  2. models: BNRM on the clean split, BT and BNRM on the noisy one (BT clean is runs/alpaca/model), and a BNRM
     proxy on the demo's training pairs (runs/demo/data/train.jsonl), all with the stored runs' settings;
  3. scores: rewards (BNRM: predictive mean and variance, θ) on the eval pairs, the hh pairs and the demo pool;
  4. results.json / results.md in runs/bnrm and docs/bnrm_bon.png, docs/bnrm_k_sweep.png.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/bnrm_compare.py
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr

from bayesrm.bnrm import explain_factors
from bayesrm.bon import BonCurve, bon_curve, default_ns
from bayesrm.data import Pair, load_pairs, save_pairs
from bayesrm.io import atomic_path, atomic_write_json, atomic_write_text
from bayesrm.metrics import auroc, pair_metrics
from bayesrm.model import CONFIG_NAME, RewardModel, RMConfig
from bayesrm.objectives import penalize_std, penalize_var
from bayesrm.plots import plot_bon, plot_k_sweep
from bayesrm.pool import load_pool
from bayesrm.train import MODEL_DIR, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flip(pairs: list[Pair], frac: float, seed: int) -> list[Pair]:
    """Swap chosen and rejected in a seeded round(frac·N) of the pairs (Coste et al. 2024's 25% noise)."""
    idx = set(random.Random(seed).sample(range(len(pairs)), round(frac * len(pairs))))
    return [Pair(p.prompt, p.rejected, p.chosen, p.id, p.source, p.meta | {"flipped": True}) if i in idx else p
            for i, p in enumerate(pairs)]


def prepare_data(args: argparse.Namespace, out: Path) -> dict[str, list[Pair]]:
    d = out / "data"
    if not (d / "hh400.jsonl").exists():
        train_pairs = load_pairs(args.alpaca / "data" / "train.jsonl")
        save_pairs(flip(train_pairs, args.noise, args.seed), d / "train_noise25.jsonl")
        hh = load_pairs(args.hh, skip_invalid=True)  # a few hh rows have an empty response
        save_pairs([hh[i] for i in sorted(random.Random(args.seed).sample(range(len(hh)), args.hh_n))],
                   d / "hh400.jsonl")
    return {"train": load_pairs(args.alpaca / "data" / "train.jsonl"),
            "train_noise25": load_pairs(d / "train_noise25.jsonl"),
            "eval": load_pairs(args.alpaca / "data" / "eval.jsonl"), "hh": load_pairs(d / "hh400.jsonl"),
            "demo_train": load_pairs(args.demo / "data" / "train.jsonl"),
            "demo_val": load_pairs(args.demo / "data" / "val.jsonl")}


def configs_from(path: Path, key_model: str = "model", key_train: str = "train") -> tuple[RMConfig, TrainConfig]:
    cfg = json.loads(path.read_text())
    return RMConfig.from_dict(cfg[key_model]), TrainConfig(**cfg[key_train])


def get_model(name: str, out: Path, mc: RMConfig, tc: TrainConfig, pairs: list[Pair], head: str,
              bnrm: dict[str, Any]) -> RewardModel:
    run = out / name
    if (run / MODEL_DIR / CONFIG_NAME).exists():
        log(f"{name}: reusing {run / MODEL_DIR}")
        return RewardModel.load(run)
    mc = replace(mc, head=head, bnrm=dict(bnrm) if head == "bnrm" else None, extra={"experiment": name})
    log(f"{name}: training ({head}, {len(pairs)} pairs, lr {tc.lr}, max_length {mc.max_length})")
    model = RewardModel(mc)
    kl_log = run / "kl.jsonl"
    run.mkdir(parents=True, exist_ok=True)

    def on_step(step: int, loss: float) -> None:
        if head == "bnrm" and step % 10 == 0:
            with open(kl_log, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, **model.bnrm_head.kl_log}) + "\n")

    t0 = time.time()
    train(model, pairs, tc, run, resume=True, on_step=on_step, show_progress=False)
    log(f"{name}: trained in {time.time() - t0:.0f} s")
    return model


def cached(path: Path, compute: Any) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    res = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **res)
    return dict(res)


def score_pairs(model: RewardModel, pairs: list[Pair], bs: int) -> dict[str, np.ndarray]:
    """Chosen/rejected rewards; for BNRM also predictive variances and Var(Δ) with the shared-Φ covariance."""
    prompts = [p.prompt for p in pairs]
    ch, rj = [p.chosen for p in pairs], [p.rejected for p in pairs]
    if model.config.head != "bnrm":
        return {"rw": model.score(prompts, ch, bs).double().numpy(),
                "rl": model.score(prompts, rj, bs).double().numpy()}
    mw, vw = model.predict_moments(prompts, ch, bs)
    ml, vl = model.predict_moments(prompts, rj, bs)
    _, vd = model.predict_pair_moments(prompts, ch, rj, bs)
    return {"rw": mw.numpy(), "rl": ml.numpy(), "vw": vw.numpy(), "vl": vl.numpy(), "vd": vd.numpy()}


def pair_row(s: dict[str, np.ndarray]) -> dict[str, float]:
    d = torch.as_tensor(s["rw"] - s["rl"])
    row = {f"map_{k}": v for k, v in pair_metrics(d).items()}
    if "vd" in s:
        row |= {f"probit_{k}": v for k, v in pair_metrics(d, torch.as_tensor(s["vd"])).items()}
    return row


def length_bias(pairs: list[Pair], s: dict[str, np.ndarray]) -> dict[str, float]:
    """Pearson r between response length (characters, words) and reward over the unique eval responses."""
    seen: dict[tuple[str, str], float] = {}
    for p, a, b in zip(pairs, s["rw"], s["rl"], strict=True):
        seen.setdefault((p.prompt, p.chosen), float(a))
        seen.setdefault((p.prompt, p.rejected), float(b))
    r = np.array(list(seen.values()))
    chars = np.array([len(k[1]) for k in seen])
    words = np.array([len(k[1].split()) for k in seen])
    return {"n": float(len(r)), "pearson_chars": float(pearsonr(chars, r).statistic),
            "pearson_words": float(pearsonr(words, r).statistic),
            "pearson_log_chars": float(pearsonr(np.log(chars), r).statistic)}


def bon_stage(args: argparse.Namespace, out: Path, model: RewardModel) -> dict[str, Any]:
    pool = load_pool(args.demo / "data" / "eval_pool.jsonl")
    prompts, responses = pool.flat()

    def compute() -> dict[str, np.ndarray]:
        m, v = model.predict_moments(prompts, responses, args.batch_size)
        return {"mean": m.numpy(), "var": v.numpy()}

    sc = cached(out / "bnrm_demo" / "eval_scores.npz", compute)
    mean, var = torch.as_tensor(sc["mean"]), torch.as_tensor(sc["var"])
    gold = pool.gold
    assert gold is not None
    ns = default_ns(min(pool.sizes()))
    stored = json.loads((args.demo / "results.json").read_text())
    seed, n_boot = stored["config"]["seed"], stored["config"]["n_boot"]
    # sanity: the stored MAP curve is reproduced from the demo's cached member_0 scores on this pool
    with np.load(args.demo / "proxy" / "member_0" / "eval_scores.npz") as z:
        map_scores = pool.unflatten(z["mean"].tolist())
    check = bon_curve("map", map_scores, map_scores, gold, ns, n_boot=n_boot, seed=seed)
    ref = next(c for c in stored["curves"] if c["name"] == "map")
    assert np.allclose(check.gold, ref["gold"]), "demo pool/gold mismatch"
    curves = [BonCurve.from_dict(c) for c in stored["curves"] if c["name"] in ("map", "la:std:k=1", "la:var:k=1")]
    sel_mean = pool.unflatten(mean.tolist())
    bnrm_sel = {"bnrm:mean": mean, "bnrm vi:std:k=1": penalize_std(mean, var, 1.0),
                "bnrm vi:var:k=1": penalize_var(mean, var, 1.0)}
    for name, sel in bnrm_sel.items():
        curves.append(bon_curve(name, pool.unflatten(sel.tolist()), sel_mean, gold, ns, n_boot=n_boot, seed=seed))
    sweep: dict[str, dict[float, float]] = {"std": {}, "var": {}}
    for pen, fn in (("std", penalize_std), ("var", penalize_var)):
        for k in args.k_sweep:
            c = bon_curve(f"vi:{pen}:k={k}", pool.unflatten(fn(mean, var, k).tolist()), sel_mean, gold, [ns[-1]],
                          n_boot=10)
            sweep[pen][float(k)] = float(c.gold[-1])
    plot_bon(curves, args.docs / "bnrm_bon.png",
             f"Best-of-n, demo pool ({len(pool)} prompts): BT MAP / Laplace vs BNRM (gold: AlpacaEval judge)")
    plot_k_sweep(sweep, args.docs / "bnrm_k_sweep.png", f"BNRM penalty weight k: gold at n={ns[-1]}")
    words = np.array([len(r.split()) for r in responses])
    return {"curves": [c.to_dict() for c in curves], "k_sweep_gold_at_max_n": sweep,
            "la_k_sweep_gold_at_max_n": stored.get("k_sweep_gold_at_max_n"),
            "pool_pearson_words_bnrm": float(pearsonr(words, sc["mean"]).statistic),
            "pool_pearson_words_bt": float(pearsonr(words, np.concatenate([np.asarray(x) for x in map_scores]))
                                           .statistic),
            "pool_mean_sigma_over_sd_mean": float(np.sqrt(sc["var"]).mean() / sc["mean"].std())}


def md_table(res: dict[str, Any]) -> str:
    acc = res["accuracy"]
    lines = ["| model | label noise | ID acc (228) | ID NLL | ID ECE | hh acc (400) | hh NLL | "
             "BNRM probit NLL ID / hh |", "|---|---|---|---|---|---|---|---|"]
    for row in acc.values():
        i, h = row["eval"], row["hh"]
        pr = (f"{i['probit_nll']:.3f} / {h['probit_nll']:.3f}" if "probit_nll" in i else "–")
        lines.append(f"| {row['head']} | {row['noise']:.0%} | {i['map_accuracy']:.3f} | {i['map_nll']:.3f} | "
                     f"{i['map_ece']:.3f} | {h['map_accuracy']:.3f} | {h['map_nll']:.3f} | {pr} |")
    lines += ["", "| model | label noise | Pearson r(chars, reward) | r(words, reward) | r(log chars, reward) |",
              "|---|---|---|---|---|"]
    for name, row in res["length_bias"].items():
        lines.append(f"| {acc[name]['head']} | {acc[name]['noise']:.0%} | {row['pearson_chars']:.3f} | "
                     f"{row['pearson_words']:.3f} | {row['pearson_log_chars']:.3f} |")
    if "sigma_auroc" in res:
        lines += ["", "AUROC of BNRM σ (chosen responses), AlpacaEval eval vs hh: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res["sigma_auroc"].items())]
    if "bon" in res:
        lines += ["", "| BoN method | gold n=1 | gold n=max (KL) | best gold (KL) |", "|---|---|---|---|"]
        for c in res["bon"]["curves"]:
            b = int(np.argmax(c["gold"]))
            hw = (c["gold_hi"][-1] - c["gold_lo"][-1]) / 2
            lines.append(f"| {c['name']} | {c['gold'][0]:.4f} | {c['gold'][-1]:.4f} ± {hw:.4f} ({c['kl'][-1]:.2f}) "
                         f"| {c['gold'][b]:.4f} ({c['kl'][b]:.2f}) |")
        sw = res["bon"]["k_sweep_gold_at_max_n"]
        lines += ["", "k sweep (gold at n=max): " + "; ".join(
            f"vi:{p} " + ", ".join(f"k={k:g}: {v:.3f}" for k, v in sw[p].items()) for p in sw)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bnrm")
    ap.add_argument("--alpaca", type=Path, default=ROOT / "runs" / "alpaca", help="BT run with the split")
    ap.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo", help="BoN demo run")
    ap.add_argument("--hh", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"))
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--hh-n", type=int, default=400)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bnrm", type=json.loads, default={}, help='BNRMConfig overrides, e.g. \'{"k": 1024}\'')
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--k-sweep", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16, 64])
    ap.add_argument("--stages", default="models,scores,bon,factors", help="comma-separated subset to run")
    ap.add_argument("--models", default="bnrm_clean,bt_noise25,bnrm_noise25,bnrm_demo",
                    help="models the 'models' stage trains (later stages train what they need)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stages = set(args.stages.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    mc, tc = configs_from(args.alpaca / "train_config.json")
    dmc, dtc = configs_from(args.demo / "config.json")
    specs = {  # name → (head, noise, train pairs)
        "bt_clean": ("linear", 0.0, "train"), "bnrm_clean": ("bnrm", 0.0, "train"),
        "bt_noise25": ("linear", args.noise, "train_noise25"), "bnrm_noise25": ("bnrm", args.noise, "train_noise25")}
    res: dict[str, Any] = {"settings": {"model": mc.to_dict(), "train": asdict(tc), "bnrm": args.bnrm,
                                        "n_train": len(data["train"]), "n_eval": len(data["eval"]),
                                        "n_hh": len(data["hh"])},
                           "accuracy": {}, "length_bias": {}}
    models: dict[str, RewardModel] = {}

    def model(name: str) -> RewardModel:  # trained (or loaded) on first use
        if name not in models:
            if name == "bt_clean":
                models[name] = RewardModel.load(args.alpaca)
            elif name == "bnrm_demo":
                models[name] = get_model(name, out, dmc, dtc, data["demo_train"], "bnrm", args.bnrm)
            else:
                head, _, key = specs[name]
                models[name] = get_model(name, out, mc, tc, data[key], head, args.bnrm)
        return models[name]

    if "models" in stages:
        for name in args.models.split(","):
            model(name)
    if "scores" in stages:
        auc = {}
        for name, (head, noise, _) in specs.items():
            m = model(name)
            ev = cached(out / "scores" / f"{name}_eval.npz", lambda m=m: score_pairs(m, data["eval"], args.batch_size))
            hh = cached(out / "scores" / f"{name}_hh.npz", lambda m=m: score_pairs(m, data["hh"], args.batch_size))
            res["accuracy"][name] = {"head": "BNRM" if head == "bnrm" else "BT", "noise": noise,
                                     "eval": pair_row(ev), "hh": pair_row(hh)}
            res["length_bias"][name] = length_bias(data["eval"], ev)
            if "vw" in ev:
                auc[name] = auroc(np.sqrt(hh["vw"]), np.sqrt(ev["vw"]))
            log(f"{name}: ID acc {res['accuracy'][name]['eval']['map_accuracy']:.3f}, "
                f"hh acc {res['accuracy'][name]['hh']['map_accuracy']:.3f}, "
                f"r(len, reward) {res['length_bias'][name]['pearson_chars']:.3f}")
        res["sigma_auroc"] = auc
        dv = cached(out / "scores" / "bnrm_demo_val.npz",
                    lambda: score_pairs(model("bnrm_demo"), data["demo_val"][:160], args.batch_size))
        res["demo_val_bnrm"] = pair_row(dv)
    if "bon" in stages:
        res["bon"] = bon_stage(args, out, model("bnrm_demo"))
    if "factors" in stages:
        seen = list(dict.fromkeys([(p.prompt, p.chosen) for p in data["eval"]]
                                  + [(p.prompt, p.rejected) for p in data["eval"]]))
        for name in ("bnrm_clean", "bnrm_demo"):
            for by in ("phi", "contribution"):
                rep = explain_factors(model(name), [a for a, _ in seen], [b for _, b in seen], 10, 5,
                                      args.batch_size, by)
                atomic_write_json(out / f"factors_{name}_{by}.json", rep)
                res.setdefault("factors", {})[f"{name}_{by}"] = {
                    "active_phi": rep["active_phi"], "k": rep["k"],
                    "top": [{k: f[k] for k in ("factor", "phi", "mean_theta", "active_frac", "length_corr")}
                            | {"top_words": [x["words"] for x in f["top"]]} for f in rep["factors"]]}
    prev = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    res = prev | {k: v for k, v in res.items() if v}
    atomic_write_json(out / "results.json", res)
    if res.get("accuracy"):
        atomic_write_text(out / "results.md", md_table(res))
        print(md_table(res))


if __name__ == "__main__":
    main()
