"""BNRM head: Weibull/Gamma maths against float64 Monte-Carlo, predictive moments, training, save/load, CLI."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import toy_pairs
from torch.distributions import Gamma, Weibull
from typer.testing import CliRunner

from bayesrm.bnrm import (
    BNRMConfig,
    BNRMHead,
    bnrm_reward_moments,
    kl_weibull_gamma,
    pair_covariance,
    weibull_mean,
    weibull_rsample,
    weibull_scale,
    weibull_var,
)
from bayesrm.cli import app
from bayesrm.laplace import fit_laplace
from bayesrm.model import CONFIG_NAME, RewardModel, RMConfig
from bayesrm.train import TrainConfig, train

SMALL = {"k": 8, "hidden": 8, "dropout": 0.0}
PROMPTS = ["What is a cat?", "What is a cat?", "Name a colour."]
RESPONSES = ["A small furry animal.", "cat " * 20, "Blue."]
FAST = TrainConfig(epochs=1, lr=2e-2, batch_size=4, warmup_ratio=0.0, checkpoint_every=0)
D = torch.float64


def _bnrm(tiny_cfg: Callable[..., RMConfig], **bnrm: object) -> RewardModel:
    return RewardModel(tiny_cfg("bert", template="plain", head="bnrm", bnrm=SMALL | bnrm))


def _perturb(model: RewardModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # B = 0 makes a fresh adapter a no-op
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- maths


@pytest.mark.parametrize(("k", "lam", "alpha", "beta"), [(1.0, 1.0, 1.0, 1.0), (1.7, 0.3, 1.0, 1.0),
                                                         (3.0, 2.0, 0.5, 2.0), (0.8, 0.05, 2.0, 0.5)])
def test_kl_weibull_gamma_matches_monte_carlo(k: float, lam: float, alpha: float, beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    kt, lt = torch.tensor(k, dtype=D), torch.tensor(lam, dtype=D)
    x = weibull_rsample(kt, lt, torch.rand(400_000, generator=g, dtype=D))
    terms = Weibull(lt, kt).log_prob(x) - Gamma(torch.tensor(alpha, dtype=D), torch.tensor(beta, dtype=D)).log_prob(x)
    se = float(terms.std() / len(terms) ** 0.5)
    kl = float(kl_weibull_gamma(kt, lt, alpha, beta))
    assert abs(kl - float(terms.mean())) < 4 * se + 1e-6, (kl, float(terms.mean()), se)
    assert kl > -1e-12  # 0 for Weibull(1, 1) = Exp(1) = Gamma(1, 1)
    k32 = kl_weibull_gamma(kt.float(), lt.float(), alpha, beta)  # fp32 agrees with fp64
    assert k32.dtype == torch.float32 and abs(float(k32) - kl) < 1e-4 * max(1.0, kl)


def test_weibull_rsample_moments_and_scale() -> None:
    g = torch.Generator().manual_seed(1)
    k, lam = torch.tensor([1.0, 1.5, 4.0, 20.0], dtype=D), torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=D)
    x = weibull_rsample(k, lam, torch.rand(200_000, 4, generator=g, dtype=D))  # (S, 4)
    ref = Weibull(lam, k)
    assert torch.allclose(weibull_mean(k, lam), ref.mean) and torch.allclose(weibull_var(k, lam), ref.variance)
    assert torch.allclose(x.mean(0), ref.mean, rtol=1e-2)
    assert torch.allclose(x.var(0), ref.variance, rtol=3e-2)
    assert torch.allclose(weibull_mean(k, weibull_scale(k, lam)), lam)  # λ(E) inverts E(λ)
    assert torch.equal(weibull_rsample(k, lam, torch.zeros(4, dtype=D)) > 0, torch.ones(4, dtype=torch.bool))


def test_reward_moments_and_pair_covariance_match_sampling() -> None:
    """θ per response, one Φ shared by both responses of each draw: mean, variance and covariance of r."""
    g = torch.Generator().manual_seed(2)
    K, S = 6, 400_000
    mu_th, k_th = torch.rand(2, K, generator=g, dtype=D) + 0.1, 1 + 3 * torch.rand(2, K, generator=g, dtype=D)
    mu_phi, k_phi = torch.rand(K, generator=g, dtype=D) + 0.1, 1 + 3 * torch.rand(K, generator=g, dtype=D)
    th = weibull_rsample(k_th, weibull_scale(k_th, mu_th), torch.rand(S, 2, K, generator=g, dtype=D))  # (S, 2, K)
    phi = weibull_rsample(k_phi, weibull_scale(k_phi, mu_phi), torch.rand(S, 1, K, generator=g, dtype=D))
    r = (th * phi).sum(-1)  # (S, 2)
    s2_th, s2_phi = weibull_var(k_th, weibull_scale(k_th, mu_th)), weibull_var(k_phi, weibull_scale(k_phi, mu_phi))
    mean, var = bnrm_reward_moments(mu_th, s2_th, mu_phi, s2_phi)
    assert torch.allclose(r.mean(0), mean, rtol=5e-3)
    assert torch.allclose(r.var(0), var, rtol=2e-2)
    cov = pair_covariance(mu_th[:1], mu_th[1:], s2_phi)
    emp = float(((r[:, 0] - r[:, 0].mean()) * (r[:, 1] - r[:, 1].mean())).mean())
    assert abs(emp - float(cov)) < 0.03 * float(cov)
    assert float(cov) > 0  # the shared Φ correlates the two rewards


# --------------------------------------------------------------------------- the head


def test_head_sample_mode_matches_predicted_pair_moments() -> None:
    torch.manual_seed(0)
    head = BNRMHead(5, BNRMConfig(**SMALL)).double().eval()
    f = torch.randn(2, 5, dtype=D)  # (2, d): one pair
    with torch.no_grad():
        draws = torch.stack([head(f, "sample") for _ in range(6_000)])  # (S, 2), one Φ per call
        mean, var = head.moments(f)
        p = head.posterior(f)
        cov = pair_covariance(p.mu_theta[:1], p.mu_theta[1:], p.var_phi)
        assert torch.equal(head(f, "mean"), head(f, "mean"))
        assert torch.allclose(head(f, "mean"), mean)
    assert torch.allclose(draws.mean(0), mean, rtol=2e-2)
    delta = draws[:, 0] - draws[:, 1]
    assert abs(float(delta.var()) - float(var.sum() - 2 * cov)) < 0.06 * float(var.sum() - 2 * cov)


def test_phi_init_and_kl_scaling() -> None:
    torch.manual_seed(0)
    alive = BNRMHead(4, BNRMConfig(k=256, hidden=4))
    code = BNRMHead(4, BNRMConfig(k=256, hidden=4, phi_init="linear"))
    assert bool((alive.phi > 0).all())
    assert 0.3 < float((code.phi <= 0).double().mean()) < 0.7  # the released init: about half dead
    f = torch.randn(6, 4)  # (2B, d): B = 3 pairs
    losses = {}
    for scale in ("dataset", "none"):
        torch.manual_seed(1)
        head = BNRMHead(4, BNRMConfig(k=16, hidden=4, eta=0.5, kl_phi_scale=scale)).train()
        head(f, "sample")
        kl_th, kl_phi = head.last_kl["theta"].detach(), head.last_kl["phi"].detach()
        losses[scale] = float(head.kl_loss(100).detach())
        n = 100 if scale == "dataset" else 1
        assert losses[scale] == pytest.approx(float(0.5 * (kl_th.sum() / 3 + kl_phi / n)), rel=1e-5)
        assert head.last_kl == {} and set(head.kl_log) == {"kl_theta", "kl_phi"}
    with pytest.raises(RuntimeError, match="training-mode forward"):
        head.kl_loss(100)
    with pytest.raises(ValueError):
        BNRMConfig(kl_phi_scale="sum")


# --------------------------------------------------------------------------- in the reward model


def test_eval_scores_are_deterministic_and_training_forwards_sample(tiny_cfg: Callable[..., RMConfig]) -> None:
    model = _bnrm(tiny_cfg, dropout=0.1)
    _perturb(model)
    model.train()
    a, b = model.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES)
    assert torch.equal(a, b) and model.training  # score runs in eval mode and restores the mode
    x = torch.tensor([model.encode(PROMPTS[:1], RESPONSES[:1])[0]])
    m = torch.ones_like(x)
    with torch.no_grad():
        assert not torch.equal(model(x, m), model(x, m))  # training mode: Weibull draws + dropout
        model.eval()
        assert torch.allclose(model(x, m), a[:1]) and torch.allclose(model.reward(x, m, "mean"), a[:1])
        assert not torch.equal(model.reward(x, m, "sample"), model.reward(x, m, "sample"))
    mean, var = model.predict_moments(PROMPTS, RESPONSES, batch_size=2)
    assert torch.allclose(mean.float(), a, atol=1e-5) and bool((var > 0).all())
    mu_d, var_d = model.predict_pair_moments(PROMPTS[:1], RESPONSES[:1], RESPONSES[1:2])  # same prompt
    assert torch.allclose(mu_d, mean[:1] - mean[1:2])
    assert float(var_d) < float(var[0] + var[1])  # the shared Φ: positive covariance


def test_training_reaches_theta_net_phi_and_lora(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = _bnrm(tiny_cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = train(model, toy_pairs(16), FAST, tmp_path, show_progress=False, eval_pairs=toy_pairs(8, seed=5))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ("head.mean_net.", "head.shape_net.", "head.phi_shape_net.", "head.phi", ".lora_B."):
        assert any(part in n for n in changed), part
    assert "head.bias" not in changed  # frozen by default: BT sees only differences
    assert not any("base_layer" in n or "embeddings" in n for n in changed)
    assert model.head.kl_log["kl_theta"] > 0 and "eval_accuracy" in hist[-1]


def test_head_only_training_freezes_the_backbone(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = RewardModel(tiny_cfg("bert", template="plain", head="bnrm", bnrm=SMALL | {"learnable_bias": True},
                                 freeze_backbone=True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("head.")}
    before = model.trainable_state()
    train(model, toy_pairs(8), dataclasses.replace(FAST, center_coef=0.1), tmp_path, show_progress=False)
    assert not torch.equal(before["head.phi"], model.head.phi.detach())
    assert float(model.head.bias.detach()) < 0  # centering pulls the non-negative θᵀΦ towards 0 through b
    assert RewardModel.load(tmp_path / "model").config.freeze_backbone


def test_resume_is_exact_with_bnrm(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, lr=2e-2, batch_size=4, warmup_ratio=0.0, checkpoint_every=2)

    def fit(out: Path, **kw: object) -> RewardModel:
        model = _bnrm(tiny_cfg, dropout=0.1)
        train(model, toy_pairs(24), cfg, out, show_progress=False, **kw)  # type: ignore[arg-type]
        return model

    class Kill(Exception):
        pass

    def kill(step: int, _loss: float) -> None:
        if step == 5:
            raise Kill

    ref = fit(tmp_path / "ref")
    with pytest.raises(Kill):
        fit(tmp_path / "run", on_step=kill)
    resumed = fit(tmp_path / "run", resume=True)
    for k, v in ref.trainable_state().items():
        assert torch.equal(resumed.trainable_state()[k], v), k


def test_save_load_gives_identical_scores(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    model = _bnrm(tiny_cfg, eta=3e-4)
    _perturb(model, seed=1)
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    before, moments = model.score(PROMPTS, RESPONSES), model.predict_moments(PROMPTS, RESPONSES)
    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert saved["head"] == "bnrm" and saved["bnrm"]["k"] == 8 and saved["bnrm"]["eta"] == 3e-4
    loaded = RewardModel.load(tmp_path / "m")
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), before)
    for a, b in zip(loaded.predict_moments(PROMPTS, RESPONSES), moments, strict=True):
        assert torch.equal(a, b)


def test_linear_head_is_unchanged_and_refuses_bnrm_calls(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    lin = RewardModel(tiny_cfg("bert"))
    assert not {"head", "bnrm", "freeze_backbone"} & set(lin.config.to_dict())  # old bayesrm.json bytes
    assert isinstance(lin.head, torch.nn.Linear) and lin.regularizer(10) is None
    with pytest.raises(ValueError, match="fit a Laplace posterior"):
        lin.predict_moments(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="Laplace-LoRA needs the linear BT head"):
        fit_laplace(_bnrm(tiny_cfg), toy_pairs(4))
    with pytest.raises(ValueError, match="unknown bnrm config fields"):
        _bnrm(tiny_cfg, n_factors=3)


def test_cli_train_bnrm_and_explain(tiny_dir: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in toy_pairs(16)))
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--backbone", tiny_dir["bert"], "--max-length",
                              "48", "--lora-r", "2", "--lora-alpha", "4", "--lr", "1e-2", "--batch-size", "4",
                              "--head", "bnrm", "--bnrm-k", "6", "--bnrm-eta", "1e-4"])
    assert res.exit_code == 0, res.output
    assert RewardModel.load(run).head.cfg.k == 6
    out = tmp_path / "explain.json"
    res = runner.invoke(app, ["explain", str(run), str(data), "--top-k", "3", "--per-factor", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert len(rep["factors"]) == 3 and all(len(f["top"]) == 2 for f in rep["factors"])
    phis = [f["phi"] for f in rep["factors"]]
    assert phis == sorted(phis, reverse=True) and {"words", "theta", "response"} <= set(rep["factors"][0]["top"][0])
    res = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "bad"), "--backbone", tiny_dir["bert"],
                              "--head", "nonsense", "--max-steps", "1"])
    assert res.exit_code == 2 and "nonsense" in res.output
