"""Tests for bayesrm.scoring: every spec family read through one Scorer equals the underlying computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import toy_pairs

from bayesrm.ensemble import EnsembleRewardModel
from bayesrm.laplace import LaplacePosterior
from bayesrm.model import RewardModel
from bayesrm.objectives import la_ens, penalize_std, penalize_var
from bayesrm.scoring import Scorer

PAIRS = toy_pairs(6, seed=3)
PROMPTS = [p.prompt for p in PAIRS] * 2
RESPONSES = [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS]


def test_map_equals_model_score(laplace_ensemble: Path) -> None:
    member = laplace_ensemble / "member_0"
    s = Scorer.load(member, "map")(PROMPTS, RESPONSES)
    ref = RewardModel.load(member).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(s.reward.float(), ref)
    torch.testing.assert_close(s.selection.float(), ref)
    assert s.std is None


@pytest.mark.parametrize("rule", ["std", "var"])
def test_la_penalties_use_the_saved_posterior(laplace_ensemble: Path, rule: str) -> None:
    member = laplace_ensemble / "member_0"
    s = Scorer.load(member, f"la:{rule}:k=2")(PROMPTS, RESPONSES)
    model = RewardModel.load(member)
    mu, var = LaplacePosterior.load(member / "laplace").predict(model, PROMPTS, RESPONSES)
    assert s.std is not None and (s.std > 0).all()
    torch.testing.assert_close(s.std.square(), var)
    pen = penalize_std if rule == "std" else penalize_var
    torch.testing.assert_close(s.selection, pen(mu, var, 2.0))
    rows = s.rows()
    assert len(rows) == len(PROMPTS) and rows[0]["selection"] == pytest.approx(float(s.selection[0]))


def test_ensemble_specs(laplace_ensemble: Path) -> None:
    ens = EnsembleRewardModel.load(laplace_ensemble)
    R = ens.score_members(PROMPTS, RESPONSES).double()  # (2, N)
    wco = Scorer.load(laplace_ensemble, "ens:wco")(PROMPTS, RESPONSES)
    torch.testing.assert_close(wco.selection, R.min(0).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(wco.reward, R.mean(0), rtol=0, atol=1e-6)
    assert wco.std is not None
    torch.testing.assert_close(wco.std, R.std(0, correction=0), rtol=0, atol=1e-6)
    M, V = ens.predict_members(None, PROMPTS, RESPONSES)
    la = Scorer.load(laplace_ensemble, "la-ens:std:k=1")(PROMPTS, RESPONSES)
    mu, var = la_ens(M, V)
    torch.testing.assert_close(la.selection, mu - var.sqrt())
    assert la.std is not None
    torch.testing.assert_close(la.std, var.sqrt())


def test_vi_penalties_read_the_bnrm_posterior(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = RewardModel(tiny_cfg("bert", head="bnrm", bnrm={"k": 8}))
    model.save(tmp_path / "bnrm")
    s = Scorer.load(tmp_path / "bnrm", "vi:std:k=0.5")(PROMPTS, RESPONSES)
    mu, var = RewardModel.load(tmp_path / "bnrm").predict_moments(PROMPTS, RESPONSES)
    assert s.std is not None and (s.std > 0).all()
    torch.testing.assert_close(s.reward, mu)
    torch.testing.assert_close(s.selection, mu - 0.5 * var.sqrt())


def test_errors_name_the_missing_piece(laplace_ensemble: Path, tmp_path: Path) -> None:
    model = RewardModel.load(laplace_ensemble / "member_0")
    model.save(tmp_path / "bare")  # same weights, no posterior
    with pytest.raises(FileNotFoundError, match="bayesrm laplace"):
        Scorer.load(tmp_path / "bare", "la:var:k=1")
    with pytest.raises(ValueError, match="BNRM"):
        Scorer(model, "vi:var:k=1")
    with pytest.raises(ValueError, match="needs an ensemble"):
        Scorer(model, "ens:mean")
    with pytest.raises(ValueError, match="prompts for"):
        Scorer(model, "map").score(["a"], ["b", "c"])
