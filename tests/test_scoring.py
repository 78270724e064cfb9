"""Tests for bayesrm.scoring: every spec family read through one Scorer equals the underlying computation."""

from __future__ import annotations

import json
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


def test_ensemble_specs_standardise_members_with_the_stored_statistics(laplace_ensemble: Path) -> None:
    ens = EnsembleRewardModel.load(laplace_ensemble)
    assert ens.ref_mean is not None and ens.ref_std is not None  # fitted by train_ensemble on training responses
    R = ens.score_members(PROMPTS, RESPONSES).double()  # (2, N) raw member rewards
    Z = (R - ens.ref_mean[:, None]) / ens.ref_std[:, None]
    wco = Scorer.load(laplace_ensemble, "ens:wco")(PROMPTS, RESPONSES)
    torch.testing.assert_close(wco.selection, Z.min(0).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(wco.reward, Z.mean(0), rtol=0, atol=1e-6)
    assert wco.std is not None
    torch.testing.assert_close(wco.std, Z.std(0, correction=0), rtol=0, atol=1e-6)
    M, V = ens.predict_members(None, PROMPTS, RESPONSES)
    la = Scorer.load(laplace_ensemble, "la-ens:std:k=1")(PROMPTS, RESPONSES)
    mu, var = la_ens(*ens.standardize(M, V))
    torch.testing.assert_close(la.selection, mu - var.sqrt())
    assert la.std is not None
    torch.testing.assert_close(la.std, var.sqrt())


def test_ensemble_specs_ignore_a_members_bt_offset(laplace_ensemble: Path, tmp_path: Path) -> None:
    """BT rewards are defined up to a shift: shifting one member's head bias must not change ens:wco or ens:uwo.

    Before member standardisation was stored and applied, `Scorer` took the min over raw rewards, so a −5
    offset on member 1 made it the min everywhere: the ens:wco argmax and the ens:uwo ranking changed.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from bayesrm.ensemble import fit_standardization, reference_responses
    from bayesrm.integrity import tensor_checksums

    shifted = tmp_path / "ens"
    shutil.copytree(laplace_ensemble, shifted)
    head = shifted / "member_1" / "model" / "head.safetensors"
    w = load_file(str(head))
    save_file({"weight": w["weight"], "bias": w["bias"] - 5.0}, str(head))
    meta = json.loads((head.parent / "bayesrm.json").read_text())  # a deliberate edit: record its checksum
    meta["checksums"] = tensor_checksums(head.parent)
    (head.parent / "bayesrm.json").write_text(json.dumps(meta))
    ref_prompts, ref_responses = reference_responses(toy_pairs(16))
    fit_standardization(shifted, ref_prompts, ref_responses, source="test")
    for spec in ("ens:wco", "ens:uwo:lambda=0.5", "ens:mean"):
        a = Scorer.load(laplace_ensemble, spec)(PROMPTS, RESPONSES).selection
        b = Scorer.load(shifted, spec)(PROMPTS, RESPONSES).selection
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # z-scores O(1); fp32 rewards near 5 round


def test_ensemble_without_statistics_refuses(laplace_ensemble: Path, tmp_path: Path) -> None:
    import json
    import shutil

    bare = tmp_path / "ens"
    shutil.copytree(laplace_ensemble, bare)
    man = json.loads((bare / "manifest.json").read_text())
    del man["standardization"]
    (bare / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="bayesrm standardize"):
        Scorer.load(bare, "ens:wco")(PROMPTS, RESPONSES)


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
