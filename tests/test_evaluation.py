"""`bayesrm eval` reports: numbers recomputed from the saved predictions, RewardBench weighting by hand, extra
sections, and the ensemble predictives against their members."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_pairs

from bayesrm.data import Pair
from bayesrm.evaluation import (
    EvalConfig,
    PairPredictions,
    PairPredictor,
    add_section,
    build_report,
    evaluate,
    render_markdown,
    rewardbench_scores,
    summary,
)
from bayesrm.metrics import expected_calibration_error, probit_probability, selective_area

CFG = EvalConfig(n_boot=50)


def _synthetic(n: int = 40, seed: int = 0) -> tuple[list[Pair], PairPredictions]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g, dtype=torch.double) + 0.5
    var = torch.rand(n, generator=g, dtype=torch.double) * 3
    pairs = [Pair(f"prompt {i // 2}", "a", "b", id=str(i), source=["alpacaeval-easy", "mt-bench-hard"][i % 2])
             for i in range(n)]
    return pairs, PairPredictions(mu, var)


def test_report_numbers_are_the_metric_functions_of_the_predictions() -> None:
    pairs, pred = _synthetic()
    rep = build_report(pairs, pred, CFG)
    m, b = rep["methods"]["map"], rep["methods"]["bayes"]
    p = probit_probability(pred.mu, pred.var)
    assert m["accuracy"] == pytest.approx(float((pred.mu > 0).double().mean()))
    assert b["accuracy"] == m["accuracy"]  # the probit never flips a sign
    assert m["nll"] == pytest.approx(float(-torch.nn.functional.logsigmoid(pred.mu).mean()))
    assert b["nll"] == pytest.approx(float(-torch.log(p).mean()))
    assert b["brier"] == pytest.approx(float(((1 - p) ** 2).mean()))
    assert b["ece"] == pytest.approx(expected_calibration_error(p))
    lo, hi = b["nll_ci"]
    assert lo < b["nll"] < hi
    sigma = pred.var.sqrt().numpy()
    correct = (pred.mu > 0).double().numpy()
    assert b["selective"]["|mu|/sigma"]["area"] == pytest.approx(
        selective_area(correct, pred.mu.abs().numpy() / sigma))
    assert b["sigma_mean"] == pytest.approx(float(sigma.mean()))
    # by hand: sign coverage at 90% is 1 − (fraction of pairs whose interval lies below 0, i.e. p ≤ 0.05)
    for name, probs in (("map", torch.sigmoid(pred.mu)), ("bayes", p)):
        assert rep["methods"][name]["coverage"]["0.9"]["observed"] == pytest.approx(float((probs > 0.05).double()
                                                                                          .mean()))
    # subsets: both halves, and RewardBench sections from their accuracies
    assert set(rep["subsets"]) == {"alpacaeval-easy", "mt-bench-hard"}
    assert rep["subsets"]["alpacaeval-easy"]["n"] == 20
    assert rep["rewardbench"]["sections"]["Chat"] == pytest.approx(rep["subsets"]["alpacaeval-easy"]["accuracy"])
    s = summary(rep)
    assert s["bayes_nll"] == b["nll"] and s["map_coverage_0.95"] == m["coverage"]["0.95"]["observed"]


def test_point_model_report_has_no_bayes_section() -> None:
    pairs, pred = _synthetic()
    rep = build_report(pairs, PairPredictions(pred.mu, None), CFG)
    assert list(rep["methods"]) == ["map"] and "error_auroc_sigma" not in rep["methods"]["map"]
    assert "bayes" not in render_markdown(rep)


def test_rewardbench_section_weighting_by_hand() -> None:
    acc = {"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5, "math-prm": 0.25, "hep-go": 0.75}
    rb = rewardbench_scores(acc)
    assert rb is not None
    chat = (100 * 1.0 + 28 * 0.5) / 128
    reasoning = (984 * 0.25 + 164 * 0.75) / (984 + 164)
    assert rb["sections"] == pytest.approx({"Chat": chat, "Reasoning": reasoning})
    assert rb["score"] == pytest.approx((chat + reasoning) / 2)
    assert rb["missing_sections"] == ["Chat Hard", "Safety"]
    assert rewardbench_scores({"alpacaeval-easy": 1.0, "helpful_base": 0.5}) is None  # not all RewardBench's


def test_extra_sections_render_and_cannot_collide() -> None:
    pairs, pred = _synthetic()
    rep = build_report(pairs, pred, CFG)
    add_section(rep, "prompt_sensitivity", "Prompt sensitivity", [{"variant": "paraphrase", "flip_rate": 0.125}],
                note="fraction of pairs whose preferred response changes")
    md = render_markdown(rep)
    assert "## Prompt sensitivity" in md and "| paraphrase | 0.1250 |" in md
    with pytest.raises(ValueError, match="already has"):
        add_section(rep, "prompt_sensitivity", "again", [])


def test_evaluate_writes_files_consistent_with_predictions(laplace_ensemble: Path, tmp_path: Path) -> None:
    member = laplace_ensemble / "member_0"
    pairs, ood = toy_pairs(12, seed=3), toy_pairs(6, seed=9)
    rep = evaluate(member, pairs, CFG, tmp_path / "ev", ood)
    for f in ("report.json", "report.md", "reliability.png", "selective.png", "predictions.jsonl"):
        assert (tmp_path / "ev" / f).stat().st_size > 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["methods"]["bayes"]["nll"] == pytest.approx(
        rep["methods"]["bayes"]["nll"])
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 12 and len(rows) == 18
    assert rep["methods"]["bayes"]["nll"] == pytest.approx(-np.mean([math.log(r["p_bayes"]) for r in test]))
    assert rep["methods"]["map"]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in test]))
    s_id = [math.sqrt(r["var_delta"]) for r in test]
    s_ood = [math.sqrt(r["var_delta"]) for r in rows if r["split"] == "ood"]
    brute = np.mean([float(a > b) + 0.5 * float(a == b) for a in s_ood for b in s_id])
    assert rep["ood"]["auroc_sigma_delta"] == pytest.approx(brute)
    assert "auroc_sigma_response" in rep["ood"] and rep["meta"]["predictive"].startswith("laplace")


def test_ensemble_predictives_match_their_members(laplace_ensemble: Path, tmp_path: Path) -> None:
    from bayesrm.laplace import LaplacePosterior
    from bayesrm.model import RewardModel

    pairs = toy_pairs(6, seed=4)
    singles = []
    for i in range(2):
        d = laplace_ensemble / f"member_{i}"
        singles.append(LaplacePosterior.load(d / "laplace").predict_pairs(RewardModel.load(d), pairs))
    la = PairPredictor(laplace_ensemble)
    assert la.kind == "la-ens"
    got = la.pairs(pairs)
    mus = torch.stack([m for m, _ in singles])
    assert torch.allclose(got.mu, mus.mean(0), atol=1e-5)
    assert torch.allclose(got.var, (singles[0][1] + singles[1][1]) / 4, rtol=1e-4)
    plain = tmp_path / "ens"  # the same members without posteriors: the spread of member gaps
    for i in range(2):
        shutil.copytree(laplace_ensemble / f"member_{i}", plain / f"member_{i}",
                        ignore=shutil.ignore_patterns("laplace"))
    ens = PairPredictor(plain)
    assert ens.kind == "ensemble"
    got = ens.pairs(pairs)
    assert torch.allclose(got.mu, mus.mean(0), atol=1e-5)
    assert torch.allclose(got.var, mus.var(0, correction=0), atol=1e-6)
