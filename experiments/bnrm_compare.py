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
import torch.nn.functional as F
from scipy.stats import pearsonr

from bayesrm.bon import BonCurve, bon_curve, default_ns
from bayesrm.data import Pair, load_pairs, save_pairs
from bayesrm.explain import explain_factors, factor_activations
from bayesrm.io import atomic_path, atomic_write_json, atomic_write_text
from bayesrm.metrics import auroc, pair_metrics
from bayesrm.model import CONFIG_NAME, RewardModel, RMConfig
from bayesrm.objectives import penalize_std, penalize_var
from bayesrm.plots import plot_bon, plot_k_sweep
from bayesrm.pool import Pool, load_pool
from bayesrm.run import MODEL_DIR
from bayesrm.train import TrainConfig, train

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
                f.write(json.dumps({"step": step, "loss": loss, **model.head.kl_log}) + "\n")

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


def _within_prompt_spearman(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean over prompts of Spearman(a, b) within each prompt's candidates."""
    from scipy.stats import spearmanr

    vals = [float(spearmanr(x, y).statistic) for x, y in zip(a, b, strict=True) if np.std(x) > 0 and np.std(y) > 0]
    return float(np.mean(vals))


NULL_GENERATOR = "example"  # AlpacaEval's constant adversarial response (" } } } verify }:param …"), gold ≈ 0.85


def _curves(pool: Pool, keep: list[list[bool]], scores: dict[str, tuple[np.ndarray, np.ndarray]], seed: int,
            n_boot: int, k_sweep: list[float]) -> tuple[list[BonCurve], dict[str, dict[float, float]]]:
    """BoN curves on the candidates with `keep`: MAP/LA of the BT proxies, mean and vi penalties of BNRM."""
    def sub(x: list[list[float]]) -> list[list[float]]:
        return [[v for v, k in zip(row, ks, strict=True) if k] for row, ks in zip(x, keep, strict=True)]

    gold = sub(pool.gold)
    ns = default_ns(min(len(g) for g in gold))
    curves, sweep = [], {"std": {}, "var": {}}  # type: ignore[var-annotated]
    for tag, (m, v) in scores.items():
        mean, var = torch.as_tensor(m), torch.as_tensor(v)
        sel_mean = sub(pool.unflatten(mean.tolist()))
        sels = {"map" if tag == "BT seed 0" else f"map ({tag})" if tag.startswith("BT") else f"bnrm:mean ({tag})": mean}
        fam = "la" if tag.startswith("BT") else "vi"
        if tag in ("BT seed 0", "BNRM seed 0"):
            sels |= {f"{fam}:std:k=1" + ("" if fam == "la" else f" ({tag})"): penalize_std(mean, var, 1.0),
                     f"{fam}:var:k=1" + ("" if fam == "la" else f" ({tag})"): penalize_var(mean, var, 1.0)}
        for label, r in sels.items():
            curves.append(bon_curve(label, sub(pool.unflatten(r.tolist())), sel_mean, gold, ns, n_boot=n_boot,
                                    seed=seed))
        if tag == "BNRM seed 0":
            for pen, fn in (("std", penalize_std), ("var", penalize_var)):
                for k in k_sweep:
                    c = bon_curve(f"vi:{pen}:k={k}", sub(pool.unflatten(fn(mean, var, k).tolist())), sel_mean, gold,
                                  [ns[-1]], n_boot=10)
                    sweep[pen][float(k)] = float(c.gold[-1])
    return curves, sweep


def bon_stage(args: argparse.Namespace, out: Path, models: dict[str, RewardModel]) -> dict[str, Any]:
    """BoN on the demo's evaluation pool with its gold: BNRM proxies next to the demo's BT MAP / LA proxies.

    Twice: on the whole pool, as the demo, and without the null-model candidates, which the judge rates highly.
    """
    pool = load_pool(args.demo / "data" / "eval_pool.jsonl")
    assert pool.gold is not None and pool.generators is not None
    prompts, responses = pool.flat()
    stored = json.loads((args.demo / "results.json").read_text())
    seed, n_boot = stored["config"]["seed"], stored["config"]["n_boot"]
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(2):  # the demo's BT proxies with their Laplace variances (member_1: demo with MEMBERS=2)
        f = args.demo / "proxy" / f"member_{i}" / "eval_scores.npz"
        if f.exists():
            with np.load(f) as z:
                scores[f"BT seed {i}"] = (z["mean"], z["var"])
    for name, model in models.items():
        def compute(model: RewardModel = model) -> dict[str, np.ndarray]:
            m, v = model.predict_moments(prompts, responses, args.batch_size)
            return {"mean": m.numpy(), "var": v.numpy()}

        sc = cached(out / name / "eval_scores.npz", compute)
        scores["BNRM seed " + (name.split("_s")[1] if "_s" in name else "0")] = (sc["mean"], sc["var"])
    res: dict[str, Any] = {}
    null = [[g == NULL_GENERATOR for g in gs] for gs in pool.generators]
    words = np.array([len(r.split()) for r in responses])
    for variant, keep in (("all", [[True] * len(gs) for gs in pool.generators]),
                          ("no_null", [[not n for n in row] for row in null])):
        curves, sweep = _curves(pool, keep, scores, seed, n_boot, args.k_sweep)
        if variant == "all":  # sanity: the demo's stored MAP / LA curves are reproduced on this pool
            for c in stored["curves"]:
                mine = next((x for x in curves if x.name == c["name"]), None)
                assert mine is None or np.allclose(mine.gold, c["gold"]), f"demo pool mismatch at {c['name']}"
        suffix = "" if variant == "all" else "_no_null"
        title = "Best-of-n, demo pool" + (" without the null-model candidates" if suffix else "")
        plot_bon(curves, args.docs / f"bnrm_bon{suffix}.png", f"{title} ({len(pool)} prompts; gold: AlpacaEval judge)")
        plot_k_sweep(sweep, args.docs / f"bnrm_k_sweep{suffix}.png", "BNRM vi penalty weight k: gold at n=max")
        top = {}
        for tag, (m, _) in scores.items():
            s = pool.unflatten(m.tolist())
            picks = [int(np.argmax(np.where(keep[i], row, -np.inf))) for i, row in enumerate(s)]  # n=max choice
            kept = [([v for v, k in zip(r, ks, strict=True) if k], [g for g, k in zip(gs, ks, strict=True) if k])
                    for r, gs, ks in zip(s, pool.gold, keep, strict=True)]
            top[tag] = {"null_picked_at_max_n": float(np.mean([null[i][j] for i, j in enumerate(picks)])),
                        "within_prompt_spearman_gold": _within_prompt_spearman([a for a, _ in kept],
                                                                               [b for _, b in kept])}
        res[variant] = {"curves": [c.to_dict() for c in curves], "k_sweep_gold_at_max_n": sweep, "proxies": top}
    res["null_gold_mean"] = float(np.mean([g for gs, ns_ in zip(pool.gold, null, strict=True)
                                           for g, n in zip(gs, ns_, strict=True) if n]))
    res["pool_pearson_words"] = {t: float(pearsonr(words, m).statistic) for t, (m, _) in scores.items()}
    res["sigma"] = {t: {"mean_sigma_over_sd_mean": float(np.sqrt(v).mean() / m.std()),
                        "pearson_mean_sigma": float(pearsonr(m, np.sqrt(v)).statistic),
                        "within_prompt_spearman_mean_sigma": _within_prompt_spearman(
                            pool.unflatten(m.tolist()), pool.unflatten(np.sqrt(v).tolist()))}
                    for t, (m, v) in scores.items()}
    res["la_k_sweep_gold_at_max_n"] = stored.get("k_sweep_gold_at_max_n")
    return res


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
    for variant, title in (("all", "whole demo pool"), ("no_null", "without the null-model candidates")):
        if variant not in res.get("bon", {}):
            continue
        bon = res["bon"][variant]
        lines += ["", f"BoN, {title}:", "", "| method | gold n=1 | gold n=max (KL) | best gold (KL) |",
                  "|---|---|---|---|"]
        for c in bon["curves"]:
            b = int(np.argmax(c["gold"]))
            hw = (c["gold_hi"][-1] - c["gold_lo"][-1]) / 2
            lines.append(f"| {c['name']} | {c['gold'][0]:.4f} | {c['gold'][-1]:.4f} ± {hw:.4f} ({c['kl'][-1]:.2f}) "
                         f"| {c['gold'][b]:.4f} ({c['kl'][b]:.2f}) |")
        sw = bon["k_sweep_gold_at_max_n"]
        lines += ["", "vi k sweep (gold at n=max): " + "; ".join(
            f"{p} " + ", ".join(f"k={float(k):g}: {v:.3f}" for k, v in sw[p].items()) for p in sw)]
        lines += ["", "top pick at n=max is the null-model response: " + ", ".join(
            f"{t} {v['null_picked_at_max_n']:.0%}" for t, v in bon["proxies"].items())]
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
    ap.add_argument("--demo-members", type=int, default=2, help="BNRM demo proxies (seeds 0..M-1)")
    ap.add_argument("--models", default="bnrm_clean,bt_noise25,bnrm_noise25,bnrm_demo,bnrm_demo_s1",
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
            elif name.startswith("bnrm_demo"):  # bnrm_demo_s<i>: LoRA-init and data-order seeds + i
                i = int(name.split("_s")[1]) if "_s" in name else 0
                mc_i, tc_i = replace(dmc, lora_seed=dmc.lora_seed + i), replace(dtc, data_seed=dtc.data_seed + i)
                models[name] = get_model(name, out, mc_i, tc_i, data["demo_train"], "bnrm", args.bnrm)
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
        demo = ["bnrm_demo"] + [f"bnrm_demo_s{i}" for i in range(1, args.demo_members)]
        res["bon"] = bon_stage(args, out, {n: model(n) for n in demo})
    if "factors" in stages:
        seen = list(dict.fromkeys([(p.prompt, p.chosen) for p in data["eval"]]
                                  + [(p.prompt, p.rejected) for p in data["eval"]]))
        ps, rs = [a for a, _ in seen], [b for _, b in seen]
        for name in ("bnrm_clean", "bnrm_demo"):
            theta = factor_activations(model(name), ps, rs, args.batch_size)  # (N, K)
            for by in ("phi", "contribution", "spread"):
                rep = explain_factors(model(name), ps, rs, 10, 5, args.batch_size, by, theta=theta)
                atomic_write_json(out / f"factors_{name}_{by}.json", rep)
                res.setdefault("factors", {})[f"{name}_{by}"] = {
                    "active_phi": rep["active_phi"], "active_theta": rep["active_theta"], "k": rep["k"],
                    "top": [{k: f[k] for k in ("factor", "phi", "mean_theta", "std_theta", "active_frac",
                                               "length_corr")}
                            | {"top_words": [x["words"] for x in f["top"]]} for f in rep["factors"]]}
            # the first principal direction of θΦ over responses, and how much of the reward spread it carries
            c = theta * F.relu(model(name).head.phi.detach()).double()  # (N, K) per-factor contributions
            sv = torch.linalg.svdvals(c - c.mean(0))
            res["factors"][f"{name}_svd_top1_share"] = float(sv[0] ** 2 / (sv ** 2).sum())
    prev = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    res = prev | {k: v for k, v in res.items() if v}
    atomic_write_json(out / "results.json", res)
    if res.get("accuracy"):
        atomic_write_text(out / "results.md", md_table(res))
        print(md_table(res))


if __name__ == "__main__":
    main()
