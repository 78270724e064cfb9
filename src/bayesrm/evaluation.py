"""`bayesrm eval`: calibration, interval coverage, selective prediction and OOD detection of a reward model's
MAP and Bayesian predictives on preference pairs, written as JSON, a markdown report, PNGs and per-pair jsonl.

Both predictives are read from the same pass: the point prediction is μ_Δ = r(x, y_w) − r(x, y_l) with
P(chosen) = σ(μ_Δ); the Bayesian one is the probit predictive σ(μ_Δ / √(1 + π Var(Δ)/8)) with the joint Var(Δ)
of the Laplace posterior (pair Jacobian J_w − J_l), a BNRM head's variational moments, or an ensemble's spread
of member Δs (plus the members' Laplace variances for LA-Ens). Every metric is a pure function in `metrics`;
confidence intervals are percentile bootstraps that resample prompts (pairs of one prompt move together).

Interval coverage is defined on what can be observed: under Bradley–Terry the label is the sign of the latent
utility gap U = Δ + ε (ε logistic), so the report checks how often the central predictive interval of U holds a
value of the observed sign against how often the predictive itself says it will (`metrics.interval_coverage`).

Extra metric sections (e.g. prompt sensitivity) plug in with `add_section`; `write_report` renders every section
in the markdown and keeps it in the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bayesrm.config import EvalConfig
from bayesrm.data import Pair
from bayesrm.metrics import (
    auroc,
    bootstrap_interval,
    error_auroc,
    interval_coverage,
    map_probability,
    maximum_calibration_error,
    pair_correct,
    probit_probability,
    reliability_bins,
    selective_curve,
)
from bayesrm.metrics import expected_calibration_error as ece_fn

# RewardBench sections and the example counts its leaderboard weights subsets by: allenai/reward-bench
# rewardbench/constants.py (SUBSET_MAPPING, EXAMPLE_COUNTS) at commit a32e272b3e018467f742a1b4d18c4cc3d0317d31;
# a section's score is Σ_s acc_s·n_s / Σ_s n_s over its subsets (rewardbench/utils.py calculate_scores_per_section)
# and the overall score the mean of the section scores.
REWARDBENCH_SECTIONS: dict[str, list[str]] = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
REWARDBENCH_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100, "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136, "hep-cpp": 164, "hep-go": 164,
    "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}  # math-prm is up-weighted by RewardBench (447 pairs counted as 984) to weigh as much as code


@dataclass
class PairPredictions:
    """Reward gaps of P pairs: μ_Δ (P,) and the Bayesian Var(Δ) (P,) (None for a point model)."""

    mu: torch.Tensor
    var: torch.Tensor | None


# --------------------------------------------------------------------------- one predictive


def _probabilities(pred: PairPredictions, bayes: bool) -> torch.Tensor:
    if bayes:
        assert pred.var is not None
        return probit_probability(pred.mu, pred.var)
    return map_probability(pred.mu)


def _nll_per_pair(pred: PairPredictions, bayes: bool) -> np.ndarray:
    if bayes:
        return -torch.log(_probabilities(pred, True).clamp_min(1e-12)).numpy()
    return (-F.logsigmoid(pred.mu.double())).numpy()  # exact for large |Δ|


def _with_ci(out: dict[str, Any], name: str, value: float | None, stat: Callable[[np.ndarray], float | None],
             n: int, groups: Sequence[str], cfg: EvalConfig) -> None:
    out[name] = value
    out[f"{name}_ci"] = None if value is None else bootstrap_interval(stat, n, groups, cfg.n_boot, cfg.ci_level,
                                                                      cfg.seed)


def _mean_stat(x: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda idx: float(x[idx].mean())


def predictive_metrics(pred: PairPredictions, bayes: bool, groups: Sequence[str], cfg: EvalConfig
                       ) -> dict[str, Any]:
    """Accuracy, NLL, Brier, ECE, MCE, sign coverage per level, selective areas and error AUROCs, with CIs."""
    n = len(pred.mu)
    p = _probabilities(pred, bayes)
    pn = p.numpy()
    correct = pair_correct(pred.mu).numpy()
    nll = _nll_per_pair(pred, bayes)
    brier = (1.0 - pn) ** 2
    abs_mu = pred.mu.abs().double().numpy()
    out: dict[str, Any] = {"n": n}
    _with_ci(out, "accuracy", float(correct.mean()), _mean_stat(correct), n, groups, cfg)
    _with_ci(out, "nll", float(nll.mean()), _mean_stat(nll), n, groups, cfg)
    _with_ci(out, "brier", float(brier.mean()), _mean_stat(brier), n, groups, cfg)
    _with_ci(out, "ece", ece_fn(p, cfg.n_bins), lambda i: ece_fn(p[i], cfg.n_bins), n, groups, cfg)
    _with_ci(out, "mce", maximum_calibration_error(p, cfg.n_bins),
             lambda i: maximum_calibration_error(p[i], cfg.n_bins), n, groups, cfg)
    cov = {}
    for level in cfg.levels:
        c: dict[str, Any] = dict(interval_coverage(p, level))

        def observed(i: np.ndarray, lv: float = level) -> float:
            return interval_coverage(p[i], lv)["observed"]

        _with_ci(c, "observed", c["observed"], observed, n, groups, cfg)
        cov[f"{level:g}"] = c
    out["coverage"] = cov
    rankings = {"|mu|": abs_mu}
    if bayes:
        assert pred.var is not None
        sigma = pred.var.clamp_min(0).sqrt().double().numpy()
        rankings["|mu|/sigma"] = abs_mu / np.maximum(sigma, 1e-300)
        out["sigma_mean"] = float(sigma.mean())
        _with_ci(out, "error_auroc_sigma", error_auroc(sigma, correct),
                 lambda i: error_auroc(sigma[i], correct[i]), n, groups, cfg)
    _with_ci(out, "error_auroc_neg_abs_mu", error_auroc(-abs_mu, correct),
             lambda i: error_auroc(-abs_mu[i], correct[i]), n, groups, cfg)
    sel = {}
    for name, score in rankings.items():
        curve = selective_curve(correct, score)
        entry: dict[str, Any] = {}

        def area(i: np.ndarray, s: np.ndarray = score) -> float:
            return float(selective_curve(correct[i], s[i]).mean())

        _with_ci(entry, "area", float(curve.mean()), area, n, groups, cfg)
        grid = np.linspace(0.05, 1.0, 20)
        entry["accuracy_at"] = {f"{c:.2f}": float(curve[max(round(c * n), 1) - 1]) for c in grid}
        sel[name] = entry
    out["selective"] = sel
    return out


# --------------------------------------------------------------------------- report


def _subset_rows(pairs: Sequence[Pair], pred: PairPredictions, cfg: EvalConfig) -> dict[str, dict[str, Any]] | None:
    """Per-source metrics (no CIs) when the pairs carry a source/subset; None otherwise."""
    sources = [p.source for p in pairs]
    if all(s is None for s in sources):
        return None
    out = {}
    for s in sorted({str(x) for x in sources}):
        idx = torch.tensor([i for i, x in enumerate(sources) if str(x) == s])
        sub = PairPredictions(pred.mu[idx], None if pred.var is None else pred.var[idx])
        correct = pair_correct(sub.mu).numpy()
        row: dict[str, Any] = {"n": len(idx), "accuracy": float(correct.mean()),
                               "map_nll": float(_nll_per_pair(sub, False).mean()),
                               "map_ece": ece_fn(_probabilities(sub, False), cfg.n_bins)}
        if sub.var is not None:
            sigma = sub.var.clamp_min(0).sqrt().double().numpy()
            row |= {"bayes_nll": float(_nll_per_pair(sub, True).mean()),
                    "bayes_ece": ece_fn(_probabilities(sub, True), cfg.n_bins), "sigma_mean": float(sigma.mean()),
                    "error_auroc_sigma": error_auroc(sigma, correct)}
        out[s] = row
    return out


def rewardbench_scores(subset_accuracy: dict[str, float]) -> dict[str, Any] | None:
    """RewardBench section scores (example-count weighted subset accuracies) and their mean; None unless every
    subset is one of RewardBench's."""
    if not subset_accuracy or not set(subset_accuracy) <= set(REWARDBENCH_COUNTS):
        return None
    sections = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        have = [s for s in subsets if s in subset_accuracy]
        if have:
            w = sum(REWARDBENCH_COUNTS[s] for s in have)
            sections[section] = sum(subset_accuracy[s] * REWARDBENCH_COUNTS[s] for s in have) / w
    missing = [s for s in REWARDBENCH_SECTIONS if s not in sections]
    return {"sections": sections, "score": sum(sections.values()) / len(sections), "missing_sections": missing}


def ood_metrics(id_pred: PairPredictions, ood_pred: PairPredictions,
                id_response_sigma: torch.Tensor | None = None, ood_response_sigma: torch.Tensor | None = None
                ) -> dict[str, Any]:
    """AUROC for telling OOD from in-distribution pairs by σ_Δ, by per-response σ, and by −|μ_Δ| (point baseline)."""
    out: dict[str, Any] = {"n_id": len(id_pred.mu), "n_ood": len(ood_pred.mu),
                           "auroc_neg_abs_mu": auroc(-ood_pred.mu.abs().numpy(), -id_pred.mu.abs().numpy())}
    if id_pred.var is not None and ood_pred.var is not None:
        s_id, s_ood = id_pred.var.clamp_min(0).sqrt(), ood_pred.var.clamp_min(0).sqrt()
        out |= {"auroc_sigma_delta": auroc(s_ood.numpy(), s_id.numpy()), "sigma_delta_id_mean": float(s_id.mean()),
                "sigma_delta_ood_mean": float(s_ood.mean())}
    if id_response_sigma is not None and ood_response_sigma is not None:
        out |= {"auroc_sigma_response": auroc(ood_response_sigma.numpy(), id_response_sigma.numpy()),
                "sigma_response_id_mean": float(id_response_sigma.mean()),
                "sigma_response_ood_mean": float(ood_response_sigma.mean())}
    return out


def build_report(pairs: Sequence[Pair], pred: PairPredictions, cfg: EvalConfig, meta: dict[str, Any] | None = None,
                 ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole evaluation as one JSON-ready dict (no I/O)."""
    if len(pairs) != len(pred.mu):
        raise ValueError(f"{len(pairs)} pairs but {len(pred.mu)} predictions")
    groups = [p.prompt for p in pairs]
    methods = {"map": predictive_metrics(pred, False, groups, cfg)}
    if pred.var is not None:
        methods["bayes"] = predictive_metrics(pred, True, groups, cfg)
    subsets = _subset_rows(pairs, pred, cfg)
    rb = rewardbench_scores({k: v["accuracy"] for k, v in subsets.items()}) if subsets else None
    reliability = {}
    for name in methods:
        count, conf, acc = reliability_bins(_probabilities(pred, name == "bayes"), cfg.n_bins)
        reliability[name] = {"count": count.tolist(), "confidence": _nan_to_none(conf), "accuracy": _nan_to_none(acc)}
    return {"meta": meta or {}, "config": asdict(cfg), "methods": methods, "reliability": reliability,
            "ood": ood, "subsets": subsets, "rewardbench": rb, "sections": {}}


def _nan_to_none(x: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in x]


def add_section(report: dict[str, Any], key: str, title: str, rows: list[dict[str, Any]], note: str = "") -> None:
    """Attach an extra metric section (a table of rows with the same keys); `write_report` renders it."""
    if key in report["sections"]:
        raise ValueError(f"report already has a section '{key}'")
    report["sections"][key] = {"title": title, "rows": rows, "note": note}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Flat headline numbers: {method}_{metric} for the scalar metrics, ood_*, rewardbench_score and one-row
    sections' {section}_{column}."""
    out: dict[str, Any] = {}
    for m, row in report["methods"].items():
        for k in ("n", "accuracy", "nll", "brier", "ece", "mce", "error_auroc_sigma", "error_auroc_neg_abs_mu"):
            if k in row:
                out[f"{m}_{k}"] = row[k]
        for lvl, c in row["coverage"].items():
            out[f"{m}_coverage_{lvl}"] = c["observed"]
        for r, s in row["selective"].items():
            out[f"{m}_selective_area_{r}"] = s["area"]
    for k, v in (report["ood"] or {}).items():
        out[f"ood_{k}"] = v
    if report["rewardbench"]:
        out["rewardbench_score"] = report["rewardbench"]["score"]
    for key, sec in report["sections"].items():  # one-row sections (e.g. prompt sensitivity) as key_column
        if len(sec["rows"]) == 1:
            out |= {f"{key}_{k}": v for k, v in sec["rows"][0].items() if isinstance(v, (int, float)) or v is None}
    return out


# --------------------------------------------------------------------------- markdown


def _fmt(v: Any, ci: Any = None) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        s = f"{v:.4f}"
        return s + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table followed by a blank line (pipes inside cells escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (values with bootstrap CIs in brackets; nulls as null)."""
    meth = report["methods"]
    names = list(meth)
    lvl = round(100 * report["config"]["ci_level"])
    lines = [f"# Evaluation: {report['meta'].get('model', '')} on {report['meta'].get('data', '')}", ""]
    if report["meta"]:
        lines += [", ".join(f"{k}: {v}" for k, v in report["meta"].items()), ""]
    lines += [f"## Calibration and accuracy ({lvl}% bootstrap CIs over prompts)", ""]
    rows = [[k] + [_fmt(meth[m].get(k), meth[m].get(f"{k}_ci")) for m in names]
            for k in ("accuracy", "nll", "brier", "ece", "mce")]
    lines += _table(["metric", *names], rows)
    lines += ["## Interval coverage (sign of U = Δ + ε inside the central predictive interval)", "",
              "Observed: how often the interval holds a value of the observed sign; claimed: how often the "
              "predictive says it will (≥ (1 + level)/2); decisive: intervals that exclude 0.", ""]
    rows = []
    for level in meth[names[0]]["coverage"]:
        for m in names:
            c = meth[m]["coverage"][level]
            rows.append([level, m, _fmt(c["observed"], c["observed_ci"]), _fmt(c["claimed"]), _fmt(c["decisive"])])
    lines += _table(["level", "method", "observed", "claimed", "decisive"], rows)
    lines += ["## Selective prediction (area under accuracy vs coverage) and error detection", ""]
    rows = []
    for m in names:
        for r, s in meth[m]["selective"].items():
            rows.append([m, f"rank by {r}", _fmt(s["area"], s["area_ci"])])
        for k, label in (("error_auroc_sigma", "AUROC of σ_Δ for errors"),
                         ("error_auroc_neg_abs_mu", "AUROC of −|μ_Δ| for errors")):
            if k in meth[m]:
                rows.append([m, label, _fmt(meth[m][k], meth[m].get(f"{k}_ci"))])
    lines += _table(["method", "quantity", "value"], rows)
    if report["ood"]:
        lines += ["## Out-of-distribution detection (AUROC, OOD = positive)", ""]
        lines += _table(["quantity", "value"], [[k, _fmt(v)] for k, v in report["ood"].items()])
    if report["subsets"]:
        cols = list(next(iter(report["subsets"].values())))
        lines += ["## Per subset", ""]
        lines += _table(["subset", *cols], [[s, *(_fmt(r.get(c)) for c in cols)]
                                            for s, r in report["subsets"].items()])
    if report["rewardbench"]:
        rb = report["rewardbench"]
        lines += ["## RewardBench sections (example-count weighted, as the official leaderboard)", ""]
        lines += _table(["section", "accuracy"], [*([k, _fmt(v)] for k, v in rb["sections"].items()),
                                                  ["score (mean of sections)", _fmt(rb["score"])]])
    for sec in report["sections"].values():
        lines += [f"## {sec['title']}", ""]
        if sec["note"]:
            lines += [sec["note"], ""]
        if sec["rows"]:
            cols = list(sec["rows"][0])
            lines += _table(cols, [[_fmt(r.get(c)) for c in cols] for r in sec["rows"]])
    return "\n".join(lines)


def prediction_rows(pairs: Sequence[Pair], pred: PairPredictions, split: str = "test") -> list[dict[str, Any]]:
    """One JSON row per pair: id, source, μ_Δ, Var(Δ), σ(μ_Δ), the probit predictive and correctness."""
    p_map = map_probability(pred.mu).tolist()
    p_bayes = probit_probability(pred.mu, pred.var).tolist() if pred.var is not None else [None] * len(pairs)
    var = pred.var.tolist() if pred.var is not None else [None] * len(pairs)
    correct = pair_correct(pred.mu).tolist()
    return [{"id": pr.id, "source": pr.source, "split": split, "mu_delta": float(m), "var_delta": v,
             "p_map": pm, "p_bayes": pb, "correct": c}
            for pr, m, v, pm, pb, c in zip(pairs, pred.mu.tolist(), var, p_map, p_bayes, correct, strict=True)]


def write_report(report: dict[str, Any], out: str | Path, rows: Sequence[dict[str, Any]],
                 curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Path]:
    """report.json, report.md, reliability.png, selective.png and predictions.jsonl in `out` (each atomic)."""
    from bayesrm.io import atomic_write_json, atomic_write_text, write_jsonl
    from bayesrm.plots import plot_reliability, plot_selective

    d = Path(out)
    paths = {"json": d / "report.json", "markdown": d / "report.md", "reliability": d / "reliability.png",
             "selective": d / "selective.png", "predictions": d / "predictions.jsonl"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], render_markdown(report) + "\n")
    plot_reliability(report["reliability"], paths["reliability"], "Reliability (symmetrised pairs)")
    plot_selective(curves, paths["selective"], "Selective prediction")
    write_jsonl(paths["predictions"], rows)
    return paths


def selective_curves(pred: PairPredictions) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(coverage, accuracy) curves for the plot: MAP ranked by |μ_Δ|, Bayes ranked by |μ_Δ|/σ_Δ."""
    correct = pair_correct(pred.mu).numpy()
    n = len(correct)
    cov = np.arange(1, n + 1) / n
    abs_mu = pred.mu.abs().double().numpy()
    out = {"rank by |μ_Δ|": (cov, selective_curve(correct, abs_mu))}
    if pred.var is not None:
        sigma = pred.var.clamp_min(0).sqrt().double().numpy()
        out["rank by |μ_Δ|/σ_Δ"] = (cov, selective_curve(correct, abs_mu / np.maximum(sigma, 1e-300)))
    return out


def dumps_summary(report: dict[str, Any]) -> str:
    """One-line JSON of `summary`, for stdout."""
    return json.dumps(summary(report))


# --------------------------------------------------------------------------- predictions from a saved model


class PairPredictor:
    """A saved model or ensemble loaded once, giving pair predictions and per-response σ.

    kind: `map` (no posterior), `laplace` (the model's saved posterior), `bnrm` (variational head), `ensemble`
    (spread of member Δs) or `la-ens` (every member has a posterior: LA-Ens moments, `objectives.la_ens`).
    """

    def __init__(self, path: str | Path, batch_size: int = 16, device: str | None = None) -> None:
        from bayesrm.ensemble import EnsembleRewardModel
        from bayesrm.laplace import LaplacePosterior
        from bayesrm.model import RewardModel
        from bayesrm.run import RunDir

        run = RunDir.of(path)
        self.batch_size = batch_size
        self.posteriors: list[Any] = []
        if run.manifest.exists() or (not run.has_model and any(run.root.glob("member_*"))):
            self.model: Any = EnsembleRewardModel.load(path, device=device)
            found = [RunDir.of(d).find_posterior() for d in self.model.member_dirs]
            self.kind = "la-ens" if all(found) else "ensemble"
            self.posteriors = self.model.load_posteriors() if self.kind == "la-ens" else []
        else:
            self.model = RewardModel.load(run.model_dir, device=device)
            post = run.find_posterior()
            if getattr(self.model.head, "has_moments", False):
                self.kind = "bnrm"
            elif post is not None:
                self.kind = "laplace"
                self.posteriors = [LaplacePosterior.load(post, self.model)]  # checked against the model
            else:
                self.kind = "map"

    def fitted_fraction(self, pairs: Sequence[Pair]) -> float | None:
        """The largest share of `pairs` any posterior was fitted on (None when none records its pairs)."""
        seen = [f for p in self.posteriors if (f := p.fitted_fraction(pairs)) is not None]
        return max(seen) if seen else None

    def describe(self) -> str:
        """What the Bayesian predictive is, for the report."""
        if self.kind == "laplace":
            c = self.posteriors[0].cfg
            return f"laplace ({c.subset}, kfac={c.kfac}, tau={c.tau_method}/{c.prior_structure}) probit"
        if self.kind in ("ensemble", "la-ens"):
            return f"{self.kind} of {len(self.model)} members, probit"
        return {"bnrm": "BNRM variational moments, probit", "map": "none (no posterior)"}[self.kind]

    def pairs(self, pairs: Sequence[Pair]) -> PairPredictions:
        """μ_Δ and Var(Δ) (None for `map`) per pair."""
        from bayesrm.objectives import la_ens
        from bayesrm.train import reward_deltas

        bs = self.batch_size
        prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
        if self.kind == "map":
            return PairPredictions(reward_deltas(self.model, pairs, bs).double(), None)
        if self.kind == "laplace":
            mu, var = self.posteriors[0].predict_pairs(self.model, pairs, bs)
            return PairPredictions(mu, var)
        if self.kind == "bnrm":
            mu, var = self.model.predict_pair_moments(prompts, chosen, rejected, bs)
            return PairPredictions(mu.double(), var.double())
        if self.kind == "ensemble":
            d = (self.model.score_members(prompts, chosen, bs) - self.model.score_members(prompts, rejected, bs))
            d = d.double()  # (M, P) member gaps
            return PairPredictions(d.mean(0), d.var(0, correction=0))
        m, v = la_ens(*self.model.predict_member_pairs(self.posteriors, pairs, bs))  # (P,), (P,)
        return PairPredictions(m, v)

    def responses(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean reward and predictive variance (None for `map`) per response, as `bayesrm score` reports them
        (ensemble members standardised)."""
        from bayesrm.scoring import Scorer

        spec = {"map": "map", "laplace": "la:std:k=1", "bnrm": "vi:std:k=1", "ensemble": "ens:mean",
                "la-ens": "la-ens:std:k=1"}[self.kind]
        s = Scorer(self.model, spec, self.posteriors or None, self.batch_size).score(prompts, responses)
        return s.reward.double(), None if s.std is None else s.std.double().square()


def prompt_sensitivity_section(predictor: PairPredictor, pairs: Sequence[Pair], report: dict[str, Any]) -> None:
    """Issue 18's check that the model reads the prompt: chosen responses under their own vs a swapped prompt."""
    from bayesrm.sensitivity import measure_prompt_sensitivity

    if len({p.prompt for p in pairs}) < 2:
        return
    sens = measure_prompt_sensitivity(lambda ps, rs: predictor.responses(ps, rs), [p.prompt for p in pairs],
                                      [p.chosen for p in pairs])
    add_section(report, "prompt_sensitivity", "Prompt sensitivity (own vs a swapped prompt, chosen responses)",
                [sens], "own_prompt_higher: P(r(x, y) > r(x', y)); ties: exact ties (a prompt-blind model ties "
                "everywhere); sigma_auroc_swapped: AUROC of σ for the swapped inputs")


ExtraSection = Callable[[PairPredictor, Sequence[Pair], dict[str, Any]], None]  # adds sections via add_section


def evaluate(path: str | Path, pairs: Sequence[Pair], cfg: EvalConfig, out: str | Path,
             ood_pairs: Sequence[Pair] = (), meta: dict[str, Any] | None = None, device: str | None = None,
             extra: Sequence[ExtraSection] = (prompt_sensitivity_section,)) -> dict[str, Any]:
    """Load `path`, predict `pairs` (and `ood_pairs`), build the report, run the `extra` section builders and
    write it all to `out`; returns the report."""
    predictor = PairPredictor(path, cfg.batch_size, device)
    pred = predictor.pairs(pairs)
    rows = prediction_rows(pairs, pred)
    ood = None
    if ood_pairs:
        ood_pred = predictor.pairs(ood_pairs)
        rows += prediction_rows(ood_pairs, ood_pred, split="ood")

        def resp(ps: Sequence[Pair]) -> torch.Tensor | None:
            var = predictor.responses([p.prompt for p in ps] * 2, [p.chosen for p in ps] + [p.rejected for p in ps])[1]
            return None if var is None else var.clamp_min(0).sqrt()

        ood = ood_metrics(pred, ood_pred, resp(pairs), resp(ood_pairs))
    meta = {"model": str(path), "predictive": predictor.describe(),
            "in_sample_fraction": predictor.fitted_fraction(pairs)} | (meta or {})
    report = build_report(pairs, pred, cfg, meta, ood)
    for fn in extra:
        fn(predictor, pairs, report)
    write_report(report, out, rows, selective_curves(pred))
    return report
