"""Tests for bayesrm.objectives: penalties, ensemble aggregates, transforms, standardisation, spec language."""

from __future__ import annotations

import math

import pytest
import torch

from bayesrm.objectives import (
    VALID_FORMS,
    Family,
    Rule,
    SelectionSpec,
    Transform,
    clip_reward,
    ensemble_mean,
    ensemble_min,
    ensemble_uwo,
    la_ens,
    log_sigmoid_transform,
    parse_spec,
    penalize_std,
    penalize_var,
    reference_stats,
    standardize,
    standardize_var,
)

T = torch.tensor
R = T([[1.0, 2.0, -1.0], [3.0, 6.0, -1.0]], dtype=torch.float64)  # (M=2, N=3) member rewards
V = T([[1.0, 2.0, 4.0], [3.0, 6.0, 0.0]], dtype=torch.float64)  # (M=2, N=3) member variances


# ------------------------------------------------------------------------------------------------ pure maths


def test_penalties_hand_computed() -> None:
    mean, var = T([1.0, 2.0, 0.0]), T([4.0, 0.25, 0.0])
    torch.testing.assert_close(penalize_std(mean, var, 0.5), T([0.0, 1.75, 0.0]))
    torch.testing.assert_close(penalize_var(mean, var, 2.0), T([-7.0, 1.5, 0.0]))
    torch.testing.assert_close(penalize_std(mean, var, 0.0), mean)


def test_ensemble_aggregates_hand_computed() -> None:
    torch.testing.assert_close(ensemble_mean(R), T([2.0, 4.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(ensemble_min(R), T([1.0, 2.0, -1.0], dtype=torch.float64))
    # ddof-0 variance across members is [1, 4, 0]; λ = 0.5
    torch.testing.assert_close(ensemble_uwo(R, 0.5), T([1.5, 2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(ensemble_uwo(R, 0.0), ensemble_mean(R))


def test_uwo_is_ddof0_not_torch_var_default() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mu = r.mean(0)
    torch.testing.assert_close(ensemble_uwo(r, 1.0), mu - ((r - mu) ** 2).mean(0))
    assert not torch.allclose(ensemble_uwo(r, 1.0), mu - r.var(0))  # ddof 1 (Coste's PPO path) is 1.25× larger


def test_la_ens_moments_hand_computed() -> None:
    mean, var = la_ens(R, V)
    torch.testing.assert_close(mean, T([2.0, 4.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(var, T([1.0, 2.0, 1.0], dtype=torch.float64))  # Σσ²/M² with M = 2


def test_la_ens_single_member_equals_la() -> None:
    m, v = R[:1], V[:1]
    mean, var = la_ens(m, v)
    torch.testing.assert_close(mean, m[0])
    torch.testing.assert_close(var, v[0])
    for pen in ("std", "var"):
        for k in (0.0, 0.5, 3.0):
            la = parse_spec(f"la:{pen}:k={k}").apply(m, v)
            ens = parse_spec(f"la-ens:{pen}:k={k}").apply(m, v)
            torch.testing.assert_close(ens, la)
    torch.testing.assert_close(parse_spec("la-ens:mean").apply(m, v), parse_spec("map").apply(m))


def test_transforms() -> None:
    r, ref = T([-3.0, 0.0, 2.0, 40.0]), T([0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(log_sigmoid_transform(r, ref), torch.log(torch.sigmoid(r - ref)))
    assert log_sigmoid_transform(T([0.0]), 0.0).item() == pytest.approx(math.log(0.5))
    assert log_sigmoid_transform(T([40.0]), 0.0).item() == pytest.approx(0.0, abs=1e-12)  # saturates above ref
    assert math.isfinite(log_sigmoid_transform(T([-200.0]), 0.0).item())  # stable far below ref
    torch.testing.assert_close(clip_reward(r, ref), T([-3.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(clip_reward(T([1.0, 3.0]), 2.0), T([-1.0, 0.0]))


def test_standardize_scales_sigma_with_rewards() -> None:
    ref = T([[0.0, 2.0, 4.0], [10.0, 10.0, 16.0]], dtype=torch.float64)  # (M, K) reference-set rewards
    mu, sd = reference_stats(ref)
    torch.testing.assert_close(mu, T([2.0, 12.0], dtype=torch.float64))
    torch.testing.assert_close(sd, T([math.sqrt(8 / 3), math.sqrt(8.0)], dtype=torch.float64))
    z = standardize(R, mu, sd)
    torch.testing.assert_close(z[1], (R[1] - 12.0) / math.sqrt(8.0))
    zs = standardize(ref, mu, sd)
    torch.testing.assert_close(zs.mean(-1), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(zs.std(-1, correction=0), torch.ones(2, dtype=torch.float64))
    # penalising then standardising = standardising (r, σ²) consistently then penalising
    zv = standardize_var(V, sd)
    torch.testing.assert_close(penalize_std(z, zv, 1.5), standardize(penalize_std(R, V, 1.5), mu, sd))


# ------------------------------------------------------------------------------------------------ spec language


CANONICAL = ["map", "la:std:k=1", "la:var:k=0.25", "ens:mean", "ens:wco", "ens:uwo:lambda=0.5", "la-ens:mean",
             "la-ens:std:k=2", "la-ens:var:k=1", "map+logsig", "ens:uwo:lambda=0.1+clip", "la-ens:var:k=1.5+logsig"]


@pytest.mark.parametrize("text", CANONICAL)
def test_spec_round_trip(text: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec


@pytest.mark.parametrize(("text", "canonical"), [
    ("la:var:k=1.0", "la:var:k=1"), (" LA:Var:k=1e-3 ", "la:var:k=0.001"), ("ens:uwo:lambda=0", "ens:uwo:lambda=0"),
    ("la:std:k=0.1", "la:std:k=0.1"), ("map+clip", "map+clip"),
])
def test_spec_canonical_form(text: str, canonical: str) -> None:
    assert str(parse_spec(text)) == canonical
    assert parse_spec(canonical) == parse_spec(text)


def test_valid_forms_all_parse() -> None:
    for form in VALID_FORMS:
        text = form.replace("=K", "=1").replace("=L", "=0.5")
        assert str(parse_spec(text)) == text


def test_spec_fields_and_enums() -> None:
    s = parse_spec("ens:uwo:lambda=0.5+logsig")
    assert (s.family, s.rule, s.weight, s.transform) == (Family.ENS, Rule.UWO, 0.5, Transform.LOGSIG)
    assert SelectionSpec("la", "var", 1) == parse_spec("la:var:k=1")  # strings are accepted for the enums
    assert SelectionSpec(Family.MAP) == parse_spec("map")


@pytest.mark.parametrize(("text", "variance", "ensemble"), [
    ("map", False, False), ("la:std:k=1", True, False), ("la:var:k=1", True, False), ("ens:mean", False, True),
    ("ens:wco", False, True), ("ens:uwo:lambda=0.5", False, True), ("la-ens:mean", False, True),
    ("la-ens:std:k=1", True, True), ("la-ens:var:k=1", True, True),
])
def test_spec_needs(text: str, variance: bool, ensemble: bool) -> None:
    s = parse_spec(text)
    assert (s.needs_variance, s.needs_ensemble, s.needs_reference) == (variance, ensemble, False)
    assert parse_spec(text + "+clip").needs_reference


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "unknown family"), ("bogus", "unknown family"), ("la", "needs a rule"), ("la:mean", "does not take rule"),
    ("map:mean", "takes no rule"), ("ens:uwo", "lambda=<number>"), ("ens:uwo:k=1", "lambda=<number>"),
    ("la:var", "k=<number>"), ("la:var:k=", "k=<number>"), ("la:var:k=abc", "not a number"),
    ("la:var:k=-1", "≥ 0"), ("la:std:k=nan", "finite"), ("la:std:k=inf", "finite"), ("ens:wco:lambda=1", "no weight"),
    ("ens:mean:k=1", "no weight"), ("la:var:k=1:extra", "k=<number>"), ("map+foo", "unknown transform"),
    ("map+clip+logsig", "at most one"), ("ens:median", "unknown rule"),
])
def test_spec_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="bad selection spec") as e:
        parse_spec(text)
    assert fragment in str(e.value)
    if fragment not in ("not a number", "≥ 0", "finite"):
        assert "valid forms: map, la:std:k=K" in str(e.value)


def test_spec_constructor_errors() -> None:
    with pytest.raises(ValueError, match="needs a finite k"):
        SelectionSpec(Family.LA, Rule.VAR)
    with pytest.raises(ValueError, match="does not take rule"):
        SelectionSpec(Family.ENS, Rule.STD, 1.0)
    with pytest.raises(ValueError, match="takes no weight"):
        SelectionSpec(Family.MAP, weight=1.0)


# ------------------------------------------------------------------------------------------------ apply


def test_apply_matches_functions() -> None:
    torch.testing.assert_close(parse_spec("map").apply(R[:1]), R[0])
    torch.testing.assert_close(parse_spec("map").apply(R[0]), R[0])  # (N,) is a single model
    torch.testing.assert_close(parse_spec("la:std:k=2").apply(R[1:], V[1:]), penalize_std(R[1], V[1], 2.0))
    torch.testing.assert_close(parse_spec("la:var:k=2").apply(R[1], V[1]), penalize_var(R[1], V[1], 2.0))
    torch.testing.assert_close(parse_spec("ens:mean").apply(R), ensemble_mean(R))
    torch.testing.assert_close(parse_spec("ens:wco").apply(R, V), ensemble_min(R))  # variances ignored
    torch.testing.assert_close(parse_spec("ens:uwo:lambda=0.5").apply(R), ensemble_uwo(R, 0.5))
    torch.testing.assert_close(parse_spec("la-ens:mean").apply(R), ensemble_mean(R))
    mu, var = la_ens(R, V)
    torch.testing.assert_close(parse_spec("la-ens:std:k=1").apply(R, V), penalize_std(mu, var, 1.0))
    torch.testing.assert_close(parse_spec("la-ens:var:k=3").apply(R, V), T([-1.0, -2.0, -4.0], dtype=torch.float64))


def test_apply_transforms_need_ref() -> None:
    ref = T([2.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(parse_spec("ens:mean+clip").apply(R, ref=ref), T([0.0, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(parse_spec("ens:wco+logsig").apply(R, ref=ref),
                               log_sigmoid_transform(ensemble_min(R), ref))
    torch.testing.assert_close(parse_spec("map+clip").apply(R[:1], ref=1.5), T([-0.5, 0.0, -2.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="reference reward"):
        parse_spec("map+logsig").apply(R[:1])


def test_apply_errors() -> None:
    with pytest.raises(ValueError, match="scores one model"):
        parse_spec("map").apply(R)
    with pytest.raises(ValueError, match="scores one model"):
        parse_spec("la:var:k=1").apply(R, V)
    with pytest.raises(ValueError, match="needs predictive variances"):
        parse_spec("la-ens:var:k=1").apply(R)
    with pytest.raises(ValueError, match="do not match"):
        parse_spec("la-ens:var:k=1").apply(R, V[:, :2])
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        parse_spec("ens:mean").apply(torch.zeros(2, 2, 2))
