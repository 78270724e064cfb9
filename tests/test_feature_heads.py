"""Fast-path heads: exact GGN vs torch.func, marglik τ vs a brute-force evidence grid, vectorised = separate runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_pairs

from bayesrm.config import HeadConfig, LaplaceConfig, LaplaceParams
from bayesrm.data import DataError
from bayesrm.feature_heads import (
    HeadStack,
    dense_ggn,
    fit_head_laplace,
    load_heads,
    predict_pairs,
    save_heads,
    train_heads,
)
from bayesrm.features import PairFeatures, pair_features
from bayesrm.laplace import HEAD_KEY, fit_laplace
from bayesrm.losses import bradley_terry_loss
from bayesrm.model import RewardModel

D = torch.double


def _feats(n: int = 40, d: int = 5, seed: int = 0) -> PairFeatures:
    """Features where a hidden direction decides the preference, with label noise."""
    g = torch.Generator().manual_seed(seed)
    fw, fl = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, d, generator=g, dtype=D)
    u = torch.linspace(1.0, -0.5, d, dtype=D)
    flip = (fw - fl) @ u + 0.7 * torch.randn(n, generator=g, dtype=D) < 0
    fw[flip], fl[flip] = fl[flip].clone(), fw[flip].clone()
    return PairFeatures(fw, fl, "test")


def _oracle_ggn(stack: HeadStack, feats: PairFeatures, which: LaplaceParams) -> torch.Tensor:
    """Σ_n J_nᵀ H_n J_n, J_n = jacrev of Δ_n w.r.t. the head parameters, H_n = ∂²BT/∂Δ² (jacrev twice)."""
    from torch.func import functional_call, jacrev

    names = ["w"] if which is LaplaceParams.LAST or not stack.is_mlp else ["W1", "b1", "w"]
    params = {n: p.detach() for n, p in stack.named_parameters()}

    def delta(sub: dict[str, torch.Tensor]) -> torch.Tensor:
        p = params | sub
        return (functional_call(stack, p, (feats.chosen,)) - functional_call(stack, p, (feats.rejected,)))[0]

    jac = jacrev(delta)({n: params[n] for n in names})  # name → (N, M, ...)
    J = torch.cat([jac[n][:, 0].flatten(1) for n in names], 1)  # (N, P)
    d2 = torch.stack([jacrev(jacrev(lambda x: bradley_terry_loss(x, torch.zeros((), dtype=D))))(x) for x in delta(
        {n: params[n] for n in names})])  # (N,)
    return torch.einsum("np,n,nq->pq", J, d2, J)


@pytest.mark.parametrize(("kind", "which"), [("linear", LaplaceParams.LAST), ("mlp", LaplaceParams.LAST),
                                             ("mlp", LaplaceParams.ALL)])
def test_exact_ggn_matches_torch_func(kind: str, which: LaplaceParams) -> None:
    feats = _feats()
    stack = train_heads(feats, HeadConfig(kind=kind, hidden=3, epochs=5, batch_size=16))
    J = stack.pair_jacobian(feats.chosen, feats.rejected, 0, which)
    with torch.no_grad():
        delta = (stack(feats.chosen) - stack(feats.rejected))[0]
    ggn = dense_ggn(J, delta)
    torch.testing.assert_close(ggn, _oracle_ggn(stack, feats, which), atol=1e-10, rtol=1e-9)
    assert J.shape[1] == stack.flat_params(which).shape[1]


def _evidence(ggn: torch.Tensor, log_lik: float, theta: torch.Tensor, tau: float) -> float:
    """log p(D|θ*) − ½ log det(I + GGN/τ) − ½ τ‖θ*‖², by a dense slogdet (no eigen-grid code)."""
    eye = torch.eye(ggn.shape[0], dtype=D)
    return log_lik - 0.5 * float(torch.linalg.slogdet(eye + ggn / tau)[1]) - 0.5 * tau * float(theta.square().sum())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_marglik_tau_is_the_evidence_maximiser(kind: str) -> None:
    feats = _feats(60)
    stack = train_heads(feats, HeadConfig(kind=kind, hidden=4, epochs=30, batch_size=16, l2=1e-2))
    post = fit_head_laplace(stack, feats)
    J = stack.pair_jacobian(feats.chosen, feats.rejected)
    with torch.no_grad():
        delta = (stack(feats.chosen) - stack(feats.rejected))[0]
    ggn, theta = dense_ggn(J, delta), stack.flat_params()[0]
    log_lik = float(torch.nn.functional.logsigmoid(delta).sum())
    grid = np.logspace(-4, 4, 4001)  # ratio 1.0046 between neighbours
    ev = [_evidence(ggn, log_lik, theta, float(t)) for t in grid]
    best = float(grid[int(np.argmax(ev))])
    tau = post.tau[HEAD_KEY]
    assert abs(math.log(tau) - math.log(best)) < 0.01
    assert post.log_marginal_likelihood() == pytest.approx(_evidence(ggn, log_lik, theta, tau), abs=1e-8)
    assert post.log_marginal_likelihood() >= max(ev) - 1e-9


def test_laplace_variance_is_j_sigma_jt() -> None:
    feats = _feats()
    stack = train_heads(feats, HeadConfig(kind="mlp", hidden=3, epochs=5))
    post = fit_head_laplace(stack, feats, which="all")
    mu, var = predict_pairs(stack, feats, post, which="all")
    J = stack.pair_jacobian(feats.chosen, feats.rejected, 0, "all")
    with torch.no_grad():
        delta = (stack(feats.chosen) - stack(feats.rejected))[0]
    tau = post.tau[HEAD_KEY]
    cov = torch.linalg.inv(dense_ggn(J, delta) + tau * torch.eye(J.shape[1], dtype=D))
    torch.testing.assert_close(var, torch.einsum("np,pq,nq->n", J, cov, J), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(mu, delta)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_vectorised_ensemble_equals_separate_trainings(kind: str) -> None:
    feats = _feats(50)
    cfg = dict(kind=kind, hidden=4, epochs=6, batch_size=16, seed=3)
    together = train_heads(feats, HeadConfig(members=3, **cfg))  # type: ignore[arg-type]
    for i in range(3):
        alone = train_heads(feats, HeadConfig(members=1, **(cfg | {"seed": 3 + i})))  # type: ignore[arg-type]
        for (n, p), q in zip(together.named_parameters(), alone.parameters(), strict=True):
            torch.testing.assert_close(p[i], q[0], atol=1e-12, rtol=1e-10, msg=n)
    init = HeadStack(5, HeadConfig(members=3, **cfg), D)  # type: ignore[arg-type]
    assert not torch.allclose(init.w, together.w)  # training moved the weights


def test_training_learns_the_preference() -> None:
    train, test = _feats(400, seed=0), _feats(400, seed=1)
    stack = train_heads(train, HeadConfig(epochs=40))
    mu, var = predict_pairs(stack, test)
    assert float((mu > 0).double().mean()) > 0.8 and float(var.abs().max()) == 0.0  # one member: no spread


def test_fast_head_laplace_equals_fit_laplace_head(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """Same weights, same pairs: the cached-feature posterior is the backbone-pass head-only posterior."""
    model, pairs = RewardModel(tiny_cfg("bert", freeze_backbone=True)), toy_pairs(12)
    slow = fit_laplace(model, pairs, LaplaceConfig(subset="head", prior_structure="global", batch_size=4))
    feats = pair_features(model, pairs)
    stack = HeadStack(feats.chosen.shape[1], HeadConfig())
    with torch.no_grad():
        stack.w.copy_(model.head.weight)
    fast = fit_head_laplace(stack, feats, prior_mean=model.head_init)  # fit_laplace's prior_mean='init'
    assert fast.tau[HEAD_KEY] == pytest.approx(slow.tau[HEAD_KEY], rel=1e-4)
    assert fast.log_marginal_likelihood() == pytest.approx(slow.log_marginal_likelihood(), rel=1e-6)
    mu_s, var_s = slow.predict_pairs(model, pairs)
    mu_f, var_f = predict_pairs(stack, feats, fast)
    torch.testing.assert_close(mu_f, mu_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var_f, var_s, atol=1e-6, rtol=1e-4)


def test_save_load_round_trip(tmp_path: Path) -> None:
    feats = _feats()
    stack = train_heads(PairFeatures(feats.chosen.float(), feats.rejected.float(), "t"),
                        HeadConfig(kind="mlp", hidden=3, members=2, epochs=3))
    post = fit_head_laplace(stack, PairFeatures(feats.chosen.float(), feats.rejected.float(), "t"))
    save_heads(tmp_path / "h", stack, {"backbone": "x"}, post, {"n_train": 40})
    stack2, meta, post2 = load_heads(tmp_path / "h")
    assert meta["n_train"] == 40 and post2 is not None and post2.tau == post.tau
    f32 = PairFeatures(feats.chosen.float(), feats.rejected.float(), "t")
    for a, b in zip(predict_pairs(stack, f32, post), predict_pairs(stack2, f32, post2), strict=True):
        torch.testing.assert_close(a, b)
    f = tmp_path / "h" / "heads.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the weights
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_heads(tmp_path / "h")
    (tmp_path / "h" / "heads.json").write_text("{")
    with pytest.raises(DataError, match="damaged"):
        load_heads(tmp_path / "h")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        HeadConfig(kind="transformer")
    with pytest.raises(ValueError, match="members"):
        HeadConfig(members=0)


@pytest.mark.parametrize(("kind", "which"), [("linear", LaplaceParams.LAST), ("mlp", LaplaceParams.ALL)])
def test_response_jacobian_matches_torch_func(kind: str, which: LaplaceParams) -> None:
    from torch.func import functional_call, jacrev

    stack = HeadStack(5, HeadConfig(kind=kind, hidden=4, members=2), D)
    f = _feats(n=7).chosen
    names = ["w"] if which is LaplaceParams.LAST else ["W1", "b1", "w"]
    params = {n: p.detach() for n, p in stack.named_parameters()}
    jac = jacrev(lambda sub: functional_call(stack, params | sub, (f,))[1])({n: params[n] for n in names})
    want = torch.cat([jac[n][:, 1].flatten(1) for n in names], 1)  # member 1, (N, P)
    torch.testing.assert_close(stack.response_jacobian(f, 1, which), want)
