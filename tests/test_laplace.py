"""Laplace-LoRA against exact fp64 oracles on tiny backbones (shared/papers/laplace-lora.md §9).

Oracles are built without the hooks under test: Jacobians from `torch.func.jacrev(functional_call)`, per-token
output gradients δ_t from jacrev w.r.t. an additive perturbation of each LoRA module's output, and posteriors
from dense, materialised matrices.
"""

from __future__ import annotations

import math
import random
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_pairs
from scipy.stats import spearmanr
from torch.func import functional_call, jacrev

from bayesrm.batching import collate
from bayesrm.data import Pair
from bayesrm.kfac import batch_jacobians, head_ggn, kfac_factors, lora_modules
from bayesrm.laplace import (
    HEAD_KEY,
    KronBlock,
    LaplaceConfig,
    LaplacePosterior,
    curvature_subsample,
    fit_laplace,
)
from bayesrm.metrics import probit_probability
from bayesrm.model import RewardModel, pool_hidden
from bayesrm.train import TrainConfig, train

Tensor = torch.Tensor
KINDS = ["bert", "llama", "neox"]  # an encoder (first-token reward) and two decoders (last-token reward)


# ------------------------------------------------------------------------------------------------ helpers


def _features64(self: RewardModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """RewardModel.features without its `.float()` downcast, so an fp64 model stays fp64 end to end."""
    out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
    return pool_hidden(out[0], attention_mask, self.pooling)


def _double(model: RewardModel) -> RewardModel:
    model.double().eval()
    model.features = types.MethodType(_features64, model)
    return model


def _model(tiny_cfg: Callable[..., object], kind: str = "bert", seed: int | None = 0, **kw: object) -> RewardModel:
    """A tiny fp64 reward model; with `seed`, LoRA weights are random so that B ≠ 0 and every δ is non-zero."""
    model = _double(RewardModel(tiny_cfg(kind, template="plain", **kw)))
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.lora_parameters().values():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _batch(model: RewardModel, prompts: list[str], responses: list[str]) -> tuple[Tensor, Tensor]:
    return collate(model.encode(prompts, responses), model.pad_id)


def _pair_batch(model: RewardModel, pairs: list[Pair]) -> tuple[Tensor, Tensor]:
    """Rows: all chosen, then all rejected (the layout of the fit)."""
    prompts = [p.prompt for p in pairs]
    return _batch(model, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])


def _jac(model: RewardModel, x: Tensor, m: Tensor) -> dict[str, Tensor]:
    """Exact per-row Jacobians ∂r_b/∂θ_m (B, o, i) of every LoRA tensor (jacrev, one VJP per row)."""
    params = {k: p.detach() for k, p in model.lora_parameters().items()}
    J = jacrev(lambda p: functional_call(model, p, (x, m)), chunk_size=1)(params)
    return {k: v.detach() for k, v in J.items()}


def _flat(J: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([J[k].reshape(J[k].shape[0], -1) for k in keys], dim=1)  # (B, P), row-major per tensor


def _token_pieces(model: RewardModel, x: Tensor, m: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Raw per-token inputs a_t (B, T, i) and output gradients δ_t = ∂r/∂o_t (B, T, o), pads not masked."""
    mods = {k: model.get_submodule(k.removesuffix(".weight")) for k in model.lora_parameters()}
    a: dict[str, Tensor] = {}
    hs = [mod.register_forward_hook(lambda _m, inp, _o, k=k: a.__setitem__(k, inp[0].detach()))
          for k, mod in mods.items()]
    with torch.no_grad():
        model(x, m)
    for h in hs:
        h.remove()
    B, T = x.shape
    eps = {k: torch.zeros(B, T, mod.out_features, dtype=torch.double) for k, mod in mods.items()}

    def f(e: dict[str, Tensor]) -> Tensor:
        hooks = [mod.register_forward_hook(lambda _m, _i, out, k=k: out + e[k]) for k, mod in mods.items()]
        try:
            return model(x, m)
        finally:
            for h in hooks:
                h.remove()

    D = jacrev(f, chunk_size=1)(eps)  # (B, B, T, o) per module
    rows = torch.arange(B)
    return a, {k: D[k][rows, rows].detach() for k in mods}


def _truncate(F_: Tensor, k: int | None, trace_complement: bool) -> Tensor:
    """Dense factor with the spectrum the posterior keeps: top-k eigenpairs, ρ on the rest (laplace-lora.md §4)."""
    vals, vecs = torch.linalg.eigh(0.5 * (F_ + F_.T))
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    d = vals.numel()
    if k is None or k >= d:
        return vecs @ torch.diag(vals) @ vecs.T
    rho = float(vals[k:].sum()) / (d - k) if trace_complement else 0.0
    V = vecs[:, :k]
    return V @ torch.diag(vals[:k]) @ V.T + rho * (torch.eye(d, dtype=F_.dtype) - V @ V.T)


def _dense_precision(G: dict[str, Tensor], A: dict[str, Tensor], tau: dict[str, float], keys: list[str],
                     temperature: float = 1.0) -> Tensor:
    """blockdiag(G_m ⊗ A_m / T + τ_m I), materialised."""
    blocks = [torch.kron(G[k], A[k]) / temperature + tau[k] * torch.eye(G[k].shape[0] * A[k].shape[0],
                                                                          dtype=torch.double) for k in keys]
    return torch.block_diag(*blocks)


def _log_lik(model: RewardModel, pairs: list[Pair]) -> float:
    with torch.no_grad():
        r = model(*_pair_batch(model, pairs))
    n = len(pairs)
    return float(F.logsigmoid(r[:n] - r[n:]).sum())


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


ID_PAIRS = toy_pairs(12, seed=7)  # held out, same vocabulary and prompts as training
_OOD_WORDS = ["zebra", "quantum", "volcano", "saxophone", "invoice", "glacier", "tractor", "pyramid", "oxygen",
              "violin", "harbour", "cactus", "parliament", "molecule", "orchestra", "tunnel"]


def _ood(n: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    """toy_pairs' prompt/response shapes and lengths, with every word from a vocabulary never seen in training."""
    rng = random.Random(seed)
    prompts = [f"{rng.choice(['translate', 'summarise', 'explain'])} {rng.choice(_OOD_WORDS)}" for _ in range(n)]
    responses = [" ".join(rng.choice(_OOD_WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]
    return prompts, responses


OOD_PROMPTS, OOD_RESPONSES = _ood()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def train_pairs() -> list[Pair]:
    return toy_pairs(24)


@pytest.fixture(scope="module")
def trained(tiny_cfg: Callable[..., object], train_pairs: list[Pair], tmp_path_factory: pytest.TempPathFactory
            ) -> RewardModel:
    """A tiny bert RM trained 120 steps with lr 1e-2 (train NLL 0.006; 42 steps leave it at 0.52), then fp64."""
    model = RewardModel(tiny_cfg("bert", template="plain"))
    cfg = TrainConfig(epochs=20, lr=1e-2, batch_size=4, warmup_ratio=0.0, checkpoint_every=0)
    train(model, train_pairs, cfg, tmp_path_factory.mktemp("train"), show_progress=False)
    return _double(model)


@pytest.fixture(scope="module")
def post(trained: RewardModel, train_pairs: list[Pair]) -> LaplacePosterior:
    return fit_laplace(trained, train_pairs, LaplaceConfig(batch_size=5))


@pytest.fixture(scope="module")
def factors(trained: RewardModel, train_pairs: list[Pair]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    G, A, _ = kfac_factors(trained, train_pairs, LaplaceConfig().kfac, batch_size=24)
    return G, A


# ------------------------------------------------------------------------------------------------ T1 Jacobians


@pytest.mark.parametrize("kind", KINDS)
def test_hook_jacobians_equal_jacrev_and_ignore_padding(tiny_cfg: Callable[..., object], kind: str) -> None:
    model = _model(tiny_cfg, kind)
    mods = lora_modules(model)
    prompts = ["question 1 about cats", "what", "question 2 about dogs and maths"]
    responses = ["good kind", "great clear helpful correct short", "bad"]
    x, m = _batch(model, prompts, responses)
    assert (m == 0).any()  # rows really are padded
    r, a, g = batch_jacobians(model, mods, x, m)
    J = _jac(model, x, m)
    for k in mods:
        assert _rel(torch.einsum("bto,bti->boi", g[k], a[k]), J[k]) < 1e-12, k  # Σ_t δ_t a_tᵀ = ∂r/∂θ
    assert _rel(r, model(x, m).detach()) < 1e-14
    a_raw, d_raw = _token_pieces(model, x, m)
    pad = m == 0
    for k in mods:
        assert float(d_raw[k][pad].abs().max()) == 0.0, k  # δ = 0 on pads, before any masking
        assert _rel(g[k], d_raw[k]) < 1e-12 and _rel(a[k][~pad], a_raw[k][~pad]) < 1e-14
        assert float(a[k][pad].abs().max()) == 0.0 < float(a_raw[k][pad].abs().max())  # pads' a_t ≠ 0: masked
    # the same response alone, and batched with a much longer one (more padding), gives the same row
    x1, m1 = _batch(model, prompts[:1], responses[:1])
    x2, m2 = _batch(model, [prompts[0], "a much longer prompt " * 4], [responses[0], "and a long response " * 4])
    assert x2.shape[1] > x1.shape[1] + 10
    r1, a1, g1 = batch_jacobians(model, mods, x1, m1)
    r2, a2, g2 = batch_jacobians(model, mods, x2, m2)
    assert _rel(r2[:1], r1) < 1e-12
    for k in mods:
        J1 = torch.einsum("bto,bti->boi", g1[k], a1[k])
        J2 = torch.einsum("bto,bti->boi", g2[k], a2[k])[:1]
        assert _rel(J2, J1) < 1e-10, k


# ------------------------------------------------------------------------------------------------ T3 KFAC factors


def test_kronecker_block_of_one_token_row_is_the_exact_ggn_block(tiny_cfg: Callable[..., object]) -> None:
    """For a single row of one token J = δ aᵀ is rank one, so G ⊗ A (output factor first) is the exact block."""
    model = _model(tiny_cfg, "neox")
    mods = lora_modules(model)
    x, m = torch.tensor([[1037]]), torch.ones(1, 1, dtype=torch.long)
    lam = 0.21  # a pair's Λ = p(1 − p), entering through g = √Λ δ
    _, a, g = batch_jacobians(model, mods, x, m, weights=lambda r: torch.full_like(r, math.sqrt(lam)))
    J = _jac(model, x, m)
    exact = {k: lam * torch.outer(J[k][0].reshape(-1), J[k][0].reshape(-1)) for k in mods}  # row-major vec
    scale = max(float(e.abs().max()) for e in exact.values())
    for k in mods:
        G, A = g[k][0].T @ g[k][0], a[k][0].T @ a[k][0]  # T = 1: Σ g gᵀ and mean a aᵀ
        assert float((torch.kron(G, A) - exact[k]).abs().max()) < 1e-12 * scale, k
        assert float(exact[k].abs().max()) > 1e-6 * scale, k  # fused qkv: the v part always gets a gradient


def test_pair_kfac_is_exact_for_rank_one_lora_and_trace_exact(tiny_cfg: Callable[..., object]) -> None:
    """PAIR factorises each J_Δ; with LoRA r = 1 every J_Δ (1 × i or o × 1) is rank one, so one pair is exact."""
    pairs = toy_pairs(3, seed=6)
    for r, n in ((1, 1), (2, 3)):
        model = _model(tiny_cfg, "bert", lora_r=r, lora_alpha=2 * r)
        keys = list(model.lora_parameters())
        x, m = _pair_batch(model, pairs[:n])
        Jr = _jac(model, x, m)
        with torch.no_grad():
            rw = model(x, m)
        lam = torch.sigmoid(rw[:n] - rw[n:]) * torch.sigmoid(rw[n:] - rw[:n])
        G, A, _ = kfac_factors(model, pairs[:n], "pair")
        for k in keys:
            Jd = (Jr[k][:n] - Jr[k][n:]).reshape(n, -1)  # (n, o·i), row-major
            exact = (Jd.T * lam) @ Jd  # Σ_n Λ_n vec(J_Δ) vec(J_Δ)ᵀ
            kf = torch.kron(G[k], A[k])
            assert abs(float(kf.trace() / exact.trace()) - 1) < 1e-12, k  # trace-exact always
            if r == 1:
                assert _rel(kf, exact) < 1e-10, k


@pytest.mark.parametrize("variant", ["pair", "reduce", "expand"])
@pytest.mark.parametrize("kind", ["bert", "neox"])  # fp64 throughout (Llama's RMSNorm computes in fp32)
def test_kfac_factors_equal_brute_force_token_einsums(tiny_cfg: Callable[..., object], kind: str,
                                                       variant: str) -> None:
    model = _model(tiny_cfg, kind)
    pairs = toy_pairs(5, seed=3)
    keys = list(model.lora_parameters())
    G = {k: torch.zeros(1) for k in keys}
    A = {k: torch.zeros(1) for k in keys}
    count = dict.fromkeys(keys, 0.0)
    log_lik = 0.0
    for p in pairs:  # one pair at a time: rows (w, l)
        x, m = _pair_batch(model, [p])
        a, d = _token_pieces(model, x, m)
        J = _jac(model, x, m)
        with torch.no_grad():
            r = model(x, m)
        delta = r[0] - r[1]
        lam = float(torch.sigmoid(delta) * torch.sigmoid(-delta))
        log_lik += float(F.logsigmoid(delta))
        n_tok = m.sum(1)  # (2,)
        for k in keys:
            if variant == "pair":  # the pair's exact Jacobian J_Δ = ∂Δ/∂θ_m (o, i), factorised as a whole
                Jd = J[k][0] - J[k][1]
                G[k] = G[k] + lam * Jd @ Jd.T
                A[k] = A[k] + lam * Jd.T @ Jd
                count[k] += lam * float(Jd.square().sum())
                continue
            if variant == "reduce":  # ĝ = √Λ c_s Σ_t δ_t, ā = mean_t a_t over real tokens
                gh = math.sqrt(lam) * torch.stack([d[k][0].sum(0), -d[k][1].sum(0)])  # (2, o)
                ab = torch.stack([a[k][s][m[s] == 1].mean(0) for s in range(2)])  # (2, i)
                G[k] = G[k] + gh.T @ gh
                A[k] = A[k] + ab.T @ ab
                count[k] += 2
            else:  # every real token its own row
                dt = torch.cat([d[k][s][m[s] == 1] for s in range(2)])  # (M, o)
                at = torch.cat([a[k][s][m[s] == 1] for s in range(2)])  # (M, i)
                G[k] = G[k] + lam * dt.T @ dt
                A[k] = A[k] + at.T @ at
                count[k] += int(n_tok.sum())
    Gh, Ah, ll = kfac_factors(model, pairs, variant, batch_size=3)
    for k in keys:
        assert _rel(Gh[k], G[k]) < 1e-10 and _rel(Ah[k], A[k] / count[k]) < 1e-10, k
    assert abs(ll - log_lik) < 1e-12


@pytest.mark.parametrize("variant", ["pair", "reduce", "expand"])
def test_kfac_factor_invariances(tiny_cfg: Callable[..., object], variant: str) -> None:
    model = _model(tiny_cfg, "neox")
    pairs = toy_pairs(6, seed=4)
    G, A, ll = kfac_factors(model, pairs, variant, batch_size=len(pairs))
    for bs in (1, 3):  # batch size (and so padding) does not matter
        Gb, Ab, llb = kfac_factors(model, pairs, variant, batch_size=bs)
        assert all(_rel(Gb[k], G[k]) < 1e-10 and _rel(Ab[k], A[k]) < 1e-10 for k in G)
        assert abs(llb - ll) < 1e-10
    swapped = [Pair(p.prompt, p.rejected, p.chosen) for p in pairs]  # Λ, c_s² and J_Δ J_Δᵀ are label-free
    Gs, As, _ = kfac_factors(model, swapped, variant, batch_size=4)
    assert all(_rel(Gs[k], G[k]) < 1e-10 and _rel(As[k], A[k]) < 1e-10 for k in G)
    Gd, Ad, lld = kfac_factors(model, pairs + pairs, variant, batch_size=4)  # G sums, A averages
    assert all(_rel(Gd[k], 2 * G[k]) < 1e-10 and _rel(Ad[k], A[k]) < 1e-10 for k in G)
    assert abs(lld - 2 * ll) < 1e-10


# ------------------------------------------------------------------------------------------------ KFAC vs full GGN


def test_kfac_variances_rank_like_full_ggn_laplace(trained: RewardModel, train_pairs: list[Pair],
                                                   post: LaplacePosterior) -> None:
    """Dense full-GGN Laplace (every A–B and cross-layer coupling) vs block-diagonal KFAC, same layerwise τ.

    Measured Spearman ρ over 36 ID + OOD responses on this fixture, all at pair's τ: pair 0.955, reduce 0.758
    (at their own marglik τ: pair 0.955, expand 0.930, reduce 0.854). Across 24–120 training steps pair stayed
    in 0.85–0.99 while reduce fell to 0.08 and expand to 0.43: per-response factors drop the −J_wᵀJ_l term
    of J_Δᵀ J_Δ, which a shared prompt makes large. 0.9 leaves room for seeds and library versions.
    """
    keys = list(post.blocks)
    n = len(train_pairs)
    x, m = _pair_batch(trained, train_pairs)
    Jr = _flat(_jac(trained, x, m), keys)  # (2N, P)
    with torch.no_grad():
        r = trained(x, m)
    lam = torch.sigmoid(r[:n] - r[n:]) * torch.sigmoid(r[n:] - r[:n])
    Jd = Jr[:n] - Jr[n:]  # J_Δ
    ggn = (Jd.T * lam) @ Jd  # Σ_n Λ_n J_Δᵀ J_Δ
    tau = torch.cat([torch.full((post.blocks[k].theta.numel(),), post.tau[k], dtype=torch.double) for k in keys])
    cov = torch.linalg.inv(ggn + torch.diag(tau))
    prompts = [p.prompt for p in ID_PAIRS] * 2 + OOD_PROMPTS
    responses = [p.chosen for p in ID_PAIRS] + [p.rejected for p in ID_PAIRS] + OOD_RESPONSES
    Jt = _flat(_jac(trained, *_batch(trained, prompts, responses)), keys)
    v_full = ((Jt @ cov) * Jt).sum(1)
    rho = {}
    for variant in ("pair", "reduce"):
        p = post if variant == post.cfg.kfac else fit_laplace(trained, train_pairs, LaplaceConfig(kfac=variant))
        p.tau = post.tau  # the same prior for every approximation
        _, v_kfac = p.predict(trained, prompts, responses)
        rho[variant] = float(spearmanr(v_full.numpy(), v_kfac.numpy()).statistic)
    assert post.cfg.kfac == "pair" and rho["pair"] >= 0.9 and rho["pair"] > rho["reduce"], rho
    _, v_pair = post.predict(trained, prompts, responses)
    assert abs(float(v_pair.mean() / v_full.mean()) - 1) < 0.1  # and the scale (measured 0.98)


# ------------------------------------------------------------------------------------------------ T4/T5 algebra


@pytest.mark.parametrize(("rank", "trace_complement"), [(None, True), (3, True), (3, False)])
def test_kron_variance_equals_dense_kfac_covariance(trained: RewardModel, train_pairs: list[Pair],
                                                    factors: tuple[dict[str, Tensor], dict[str, Tensor]],
                                                    rank: int | None, trace_complement: bool) -> None:
    cfg = LaplaceConfig(rank=rank, lowrank_threshold=8, trace_complement=trace_complement, temperature=0.5,
                        tau_method="fixed", batch_size=7)
    p = fit_laplace(trained, train_pairs, cfg)
    keys = list(p.blocks)
    gen = torch.Generator().manual_seed(1)
    p.tau = {k: float(10 ** (2 * torch.rand(1, generator=gen) - 1)) for k in keys}  # a different τ per tensor
    if rank is not None:  # the large sides (16) are truncated, the rank-2 sides are kept whole
        assert all(min(b.g_vals.numel(), b.a_vals.numel()) == 2 and max(b.g_vals.numel(), b.a_vals.numel()) == 3
                   for b in p.blocks.values())
    G, A = factors
    Gt = {k: _truncate(G[k], rank if G[k].shape[0] >= 8 else None, trace_complement) for k in keys}
    At = {k: _truncate(A[k], rank if A[k].shape[0] >= 8 else None, trace_complement) for k in keys}
    cov = torch.linalg.inv(_dense_precision(Gt, At, p.tau, keys, temperature=0.5))
    prompts = [q.prompt for q in ID_PAIRS] + OOD_PROMPTS[:4]
    responses = [q.chosen for q in ID_PAIRS] + OOD_RESPONSES[:4]
    x, m = _batch(trained, prompts, responses)
    Jt = _flat(_jac(trained, x, m), keys)
    v_dense = ((Jt @ cov) * Jt).sum(1)
    mean, var = p.predict(trained, prompts, responses, batch_size=5)
    assert _rel(var, v_dense) < 1e-9
    assert _rel(mean, trained(x, m).detach()) < 1e-12
    # the evidence's log-det uses the same (truncated) spectrum
    P = _dense_precision(Gt, At, p.tau, keys, temperature=0.5)
    tau_vec = torch.cat([torch.full((p.blocks[k].theta.numel(),), p.tau[k], dtype=torch.double) for k in keys])
    logdet_ratio = float(torch.linalg.slogdet(P)[1] - tau_vec.log().sum())
    theta = torch.cat([(b.theta - b.mu0).reshape(-1) for b in p.blocks.values()])
    dense_lml = p.log_lik - 0.5 * logdet_ratio - 0.5 * float((tau_vec * theta.square()).sum())
    assert abs(p.log_marginal_likelihood() - dense_lml) < 1e-9 * abs(dense_lml)


def test_predict_is_batch_padding_and_truncation_invariant(tiny_cfg: Callable[..., object]) -> None:
    model = _model(tiny_cfg, "bert", max_length=9)  # [CLS] + 5 prompt tokens + 2 response tokens + [SEP]
    p = fit_laplace(model, toy_pairs(8, seed=5), LaplaceConfig(tau_method="fixed", prior_precision=0.3))
    long_prompt = "good bad great awful helpful rude clear vague kind harsh"  # one WordPiece per word
    short_prompt = "rude clear vague kind harsh"  # what truncation from the left keeps
    assert model.encode([long_prompt], ["correct wrong"]) == model.encode([short_prompt], ["correct wrong"])
    prompts = [long_prompt, "cats", "question 3 about dogs", "maths"]
    responses = ["correct wrong", "good", "helpful kind clear", "bad awful"]
    mean, var = p.predict(model, prompts, responses, batch_size=4)
    mean1, var1 = p.predict(model, prompts, responses, batch_size=1)
    assert _rel(var, var1) < 1e-10 and _rel(mean, mean1) < 1e-12  # batched = one by one
    _, v_short = p.predict(model, [short_prompt], ["correct wrong"])
    assert abs(float(var[0] - v_short[0])) < 1e-8 * float(v_short[0])  # truncated = the kept tokens alone


def test_pair_variance_is_var_w_plus_var_l_minus_2cov(trained: RewardModel, post: LaplacePosterior,
                                                      factors: tuple[dict[str, Tensor], dict[str, Tensor]]) -> None:
    keys = list(post.blocks)
    G, A = factors
    cov = torch.linalg.inv(_dense_precision(G, A, post.tau, keys))
    n = len(ID_PAIRS)
    Jr = _flat(_jac(trained, *_pair_batch(trained, ID_PAIRS)), keys)
    Jw, Jl = Jr[:n], Jr[n:]
    var_w, var_l = ((Jw @ cov) * Jw).sum(1), ((Jl @ cov) * Jl).sum(1)
    covar = ((Jw @ cov) * Jl).sum(1)
    mu, vd = post.predict_pairs(trained, ID_PAIRS, batch_size=5)
    assert _rel(vd, var_w + var_l - 2 * covar) < 1e-9
    _, vw = post.predict(trained, [p.prompt for p in ID_PAIRS], [p.chosen for p in ID_PAIRS])
    assert _rel(vw, var_w) < 1e-9
    assert float((covar / (var_w + var_l)).min()) > 0.05  # the shared prompt's covariance is not negligible
    with torch.no_grad():
        r = trained(*_pair_batch(trained, ID_PAIRS))
    assert _rel(mu, r[:n] - r[n:]) < 1e-12


# ------------------------------------------------------------------------------------------------ T6 evidence, τ


def _dense_marglik_terms(post: LaplacePosterior, G: dict[str, Tensor], A: dict[str, Tensor]
                         ) -> dict[str, tuple[Tensor, float]]:
    """Per tensor: eigenvalues of the materialised G ⊗ A and the scatter ‖θ* − μ0‖²."""
    return {k: (torch.linalg.eigvalsh(torch.kron(G[k], A[k])).clamp_min(0.0),
                float((b.theta - b.mu0).square().sum())) for k, b in post.blocks.items()}


def _dense_objective(terms: dict[str, tuple[Tensor, float]], keys: list[str], tau: float) -> float:
    """log p(D|τ) − log p(D|θ*) = −½ Σ_m [log det(GGN_m + τI) − p_m log τ + τ ‖θ*_m − μ0_m‖²]."""
    return -0.5 * sum(float(torch.log(ev + tau).sum()) - ev.numel() * math.log(tau) + tau * sc
                      for ev, sc in (terms[k] for k in keys))


@pytest.mark.parametrize("structure", ["layerwise", "global"])
def test_marglik_matches_dense_and_tau_is_its_maximiser(trained: RewardModel, train_pairs: list[Pair],
                                                        post: LaplacePosterior, structure: str,
                                                        factors: tuple[dict[str, Tensor], dict[str, Tensor]]
                                                        ) -> None:
    keys = list(post.blocks)
    assert abs(post.log_lik - _log_lik(trained, train_pairs)) < 1e-10
    terms = _dense_marglik_terms(post, *factors)
    gen = torch.Generator().manual_seed(2)
    tau = {k: float(10 ** (4 * torch.rand(1, generator=gen) - 2)) for k in keys}
    dense = post.log_lik + sum(_dense_objective(terms, [k], tau[k]) for k in keys)
    assert abs(post.log_marginal_likelihood(tau) - dense) < 1e-10 * abs(dense)
    p = LaplacePosterior(post.blocks, post.cfg, post.n_data, post.log_lik)  # τ = 1 everywhere
    t_ml = p.optimize_prior_precision("marglik", structure)
    groups = [[k] for k in keys] if structure == "layerwise" else [keys]
    for grp in groups:  # a fine grid of the dense objective peaks at the optimiser's τ (within one step)
        t = t_ml[grp[0]]
        assert all(t_ml[k] == t for k in grp)
        assert 1e-5 < t < 1e7, (grp, t)  # interior: not stuck at the search bounds (1e-6, 1e8)
        grid = t * torch.logspace(-1, 1, 2001, dtype=torch.double)  # step 0.1 % in τ
        vals = torch.tensor([_dense_objective(terms, grp, float(s)) for s in grid], dtype=torch.double)
        best = int(vals.argmax())
        assert 0 < best < len(grid) - 1 and abs(float(grid[best]) / t - 1) < 2.5e-3
        assert _dense_objective(terms, grp, t) >= float(vals.max()) - 1e-12 * abs(float(vals.max()))
    p.tau = dict.fromkeys(keys, 1.0)  # MacKay from τ = 1: same stationary condition τ = γ / ‖θ* − μ0‖²
    t_mk = p.optimize_prior_precision("mackay", structure)
    assert all(abs(t_mk[k] / t_ml[k] - 1) < 1e-4 for k in keys), (t_mk, t_ml)


# ------------------------------------------------------------------------------------------------ T7 predictive


def test_monte_carlo_linearised_predictive(trained: RewardModel, post: LaplacePosterior,
                                           factors: tuple[dict[str, Tensor], dict[str, Tensor]]) -> None:
    keys = list(post.blocks)
    cov = torch.linalg.inv(_dense_precision(*factors, post.tau, keys))
    L = torch.linalg.cholesky(cov)
    n = len(ID_PAIRS)
    x, m = _pair_batch(trained, ID_PAIRS)
    Jr = _flat(_jac(trained, x, m), keys)
    with torch.no_grad():
        r = trained(x, m)
    mu, Jd = r[:n] - r[n:], Jr[:n] - Jr[n:]
    S = 40_000
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(S, L.shape[0], generator=gen, dtype=torch.double) @ L.T  # θ − θ* ~ N(0, Σ_KFAC)
    deltas = mu + eps @ Jd.T  # (S, n): Δ of the linearised model
    mu_la, var_la = post.predict_pairs(trained, ID_PAIRS)
    var_mc = deltas.var(0)
    se = var_la * math.sqrt(2 / (S - 1))  # s.e. of a Gaussian sample variance
    assert float(((var_mc - var_la).abs() / se).max()) < 4.5
    assert _rel(mu_la, mu) < 1e-12
    p_mc = torch.sigmoid(deltas).mean(0)
    p_probit = probit_probability(mu_la, var_la)
    assert float((p_mc - p_probit).abs().max()) < 0.01, (p_mc - p_probit).abs().max()


# ------------------------------------------------------------------------------------------------ OOD, io


def test_sigma_grows_out_of_distribution(trained: RewardModel, post: LaplacePosterior) -> None:
    """Unseen vocabulary, same lengths: σ² and the share of the prior variance the data left are both larger.

    Measured on this fixture: mean σ² OOD/ID = 1.23, prior share 0.70 vs 0.67. Raw σ² mixes in ‖J‖² (how
    sensitive r is to θ), which the shift need not raise: after 24–60 steps the ratio was 0.96–1.00 while
    the prior share was larger OOD at every training length (0.986 vs 0.976 … 0.876 vs 0.808).
    """
    id_prompts = [p.prompt for p in ID_PAIRS] * 2
    id_responses = [p.chosen for p in ID_PAIRS] + [p.rejected for p in ID_PAIRS]
    prior = LaplacePosterior({k: KronBlock(0 * b.g_vals, b.g_vecs, 0.0, 0 * b.a_vals, b.a_vecs, 0.0, b.theta, b.mu0)
                              for k, b in post.blocks.items()}, post.cfg, post.n_data, post.log_lik)
    prior.tau = post.tau  # no curvature: σ² = Σ_m ‖J_m‖² / τ_m
    _, v_id = post.predict(trained, id_prompts, id_responses)
    _, v_ood = post.predict(trained, OOD_PROMPTS, OOD_RESPONSES)
    _, p_id = prior.predict(trained, id_prompts, id_responses)
    _, p_ood = prior.predict(trained, OOD_PROMPTS, OOD_RESPONSES)
    assert float(v_ood.mean()) > float(v_id.mean()), (float(v_ood.mean()), float(v_id.mean()))
    assert float((v_ood / p_ood).mean()) > float((v_id / p_id).mean()) + 0.02
    assert bool((v_id <= p_id).all() and (v_ood <= p_ood).all())  # data only ever removes variance


@pytest.mark.parametrize("subset", ["lora", "head"])
def test_save_load_round_trip(trained: RewardModel, train_pairs: list[Pair], tmp_path: Path, subset: str) -> None:
    p = fit_laplace(trained, train_pairs, LaplaceConfig(subset=subset, rank=3, lowrank_threshold=8))
    p.save(tmp_path / "post")
    q = LaplacePosterior.load(tmp_path / "post")
    assert q.tau == p.tau and q.cfg == p.cfg
    assert q.log_marginal_likelihood() == p.log_marginal_likelihood()
    prompts, responses = [x.prompt for x in ID_PAIRS], [x.chosen for x in ID_PAIRS]
    for a, b in zip(p.predict(trained, prompts, responses), q.predict(trained, prompts, responses), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(p.predict_pairs(trained, ID_PAIRS), q.predict_pairs(trained, ID_PAIRS), strict=True):
        assert torch.equal(a, b)
    q.check_matches(trained)


def test_marglik_tau_is_interior_after_training(post: LaplacePosterior) -> None:
    assert all(1e-5 < t < 1e7 and math.isfinite(t) for t in post.tau.values()), post.tau  # measured 0.026–0.33


def test_fit_before_training_is_degenerate_but_finite(tiny_cfg: Callable[..., object]) -> None:
    """At init B = 0, so J_A = 0 and θ*_A = μ0 (prior_mean='init'): the evidence is flat in τ_A, which is kept;
    θ*_B = μ0 = 0 makes it prefer an infinitely tight prior, so τ_B runs to the upper bound (σ² ≈ 0)."""
    model = _model(tiny_cfg, "bert", seed=None)
    p = fit_laplace(model, toy_pairs(6), LaplaceConfig(prior_precision=2.0))
    for k, b in p.blocks.items():
        if ".lora_A." in k:
            assert p.tau[k] == 2.0 and float(b.g_vals.abs().max()) == 0.0, k
        else:
            assert p.tau[k] > 1e7, k
    _, var = p.predict(model, ["question 1 about cats"], ["good kind"])
    assert bool(torch.isfinite(var).all() and (var >= 0).all())


# ------------------------------------------------------------------------------------------------ head-only


@pytest.mark.parametrize(("margin", "center"), [(0.0, 0.0), (0.5, 0.2)])
def test_head_laplace_is_exact(trained: RewardModel, train_pairs: list[Pair], margin: float, center: float) -> None:
    """Last-layer Laplace: r is linear in w, so the GGN is the training loss's exact Hessian, margin and centering
    included; the frozen bias is not a parameter and the prior is centred at the head's initial weight.

    Before: the posterior covered [w, b] (every σ² got +1/τ from the bias), had prior mean 0, and ignored the
    margin and the centering term of the loss the model was trained with.
    """
    n = len(train_pairs)
    x, m = _pair_batch(trained, train_pairs)
    b = trained.head.bias.detach()

    def rewards(w: Tensor, xx: Tensor, mm: Tensor) -> Tensor:
        return functional_call(trained, {"head.weight": w.unsqueeze(0), "head.bias": b}, (xx, mm))

    def loss(w: Tensor) -> Tensor:  # the training loss: BT with margin + centering
        r = rewards(w, x, m)
        return (-F.logsigmoid(r[:n] - r[n:] - margin) + center * (r[:n] + r[n:]).square()).sum()

    theta = trained.head.weight.detach().reshape(-1)
    assert trained.head_init is not None
    mu0 = trained.head_init.double().reshape(-1)
    H = jacrev(jacrev(loss))(theta).detach()  # exact Hessian (d, d), reverse-over-reverse
    tau = 0.7
    cfg = LaplaceConfig(subset="head", tau_method="fixed", prior_precision=tau, margin=margin, center_coef=center)
    p = fit_laplace(trained, train_pairs, cfg)
    assert list(p.blocks) == [HEAD_KEY] and p.blocks[HEAD_KEY].theta.numel() == len(theta)
    cov = torch.linalg.inv(H + tau * torch.eye(len(theta), dtype=torch.double))
    prompts = [q.prompt for q in ID_PAIRS] + OOD_PROMPTS[:3]
    responses = [q.chosen for q in ID_PAIRS] + OOD_RESPONSES[:3]
    xt, mt = _batch(trained, prompts, responses)
    Jt = jacrev(lambda w: rewards(w, xt, mt))(theta).detach()  # (B, d)
    mean, var = p.predict(trained, prompts, responses)
    assert _rel(var, ((Jt @ cov) * Jt).sum(1)) < 1e-10 and _rel(mean, trained(xt, mt).detach()) < 1e-12
    k = len(ID_PAIRS)
    Jl = jacrev(lambda w: rewards(w, *_batch(trained, prompts[:k], [q.rejected for q in ID_PAIRS])))(theta)
    Jd = Jt[:k] - Jl.detach()  # J_Δ
    _, vd = p.predict_pairs(trained, ID_PAIRS)
    assert _rel(vd, ((Jd @ cov) * Jd).sum(1)) < 1e-10
    # evidence: dense formula with the prior centred at the initial head weight; τ search = grid optimum = MacKay
    sign, logdet = torch.linalg.slogdet(H + tau * torch.eye(len(theta), dtype=torch.double))
    scatter = float((theta - mu0).square().sum())
    dense = -float(loss(theta).detach()) - 0.5 * (float(logdet) - len(theta) * math.log(tau)) - 0.5 * tau * scatter
    assert float(sign) > 0 and abs(p.log_marginal_likelihood() - dense) < 1e-10 * abs(dense)
    t_ml = p.optimize_prior_precision("marglik")[HEAD_KEY]
    ev = torch.linalg.eigvalsh(H).clamp_min(0.0)
    terms = {HEAD_KEY: (ev, scatter)}
    grid = t_ml * torch.logspace(-1, 1, 2001, dtype=torch.double)
    vals = torch.tensor([_dense_objective(terms, [HEAD_KEY], float(s)) for s in grid], dtype=torch.double)
    assert 1e-5 < t_ml < 1e7 and abs(float(grid[int(vals.argmax())]) / t_ml - 1) < 2.5e-3
    p.tau = {HEAD_KEY: 1.0}
    t_mk = p.optimize_prior_precision("mackay")[HEAD_KEY]
    assert abs(t_mk / t_ml - 1) < 1e-4


def test_pair_kfac_uses_the_training_likelihood(tiny_cfg: Callable[..., object]) -> None:
    """With margin m and centering c the GGN is Σ Λ(Δ − m) J_Δ J_Δᵀ + 2c Σ J_s J_sᵀ (J_s = J_w + J_l); PAIR keeps
    its trace exactly, and the log-likelihood is that of the training loss."""
    pairs = toy_pairs(3, seed=6)
    model = _model(tiny_cfg, "bert")
    n, margin, center = len(pairs), 0.7, 0.3
    x, m = _pair_batch(model, pairs)
    Jr = _jac(model, x, m)
    with torch.no_grad():
        r = model(x, m)
    d = r[:n] - r[n:] - margin
    lam = torch.sigmoid(d) * torch.sigmoid(-d)
    G, A, log_lik = kfac_factors(model, pairs, "pair", margin=margin, center_coef=center)
    expected_ll = float((F.logsigmoid(d) - center * (r[:n] + r[n:]).square()).sum())
    assert abs(log_lik - expected_ll) < 1e-10 * abs(expected_ll)
    for k in model.lora_parameters():
        Jd = (Jr[k][:n] - Jr[k][n:]).reshape(n, -1)
        Js = (Jr[k][:n] + Jr[k][n:]).reshape(n, -1)
        exact = (Jd.T * lam) @ Jd + 2 * center * Js.T @ Js
        kf = torch.kron(G[k], A[k])
        assert abs(float(kf.trace() / exact.trace()) - 1) < 1e-12, k
    with pytest.raises(ValueError, match="kfac='pair'"):
        LaplaceConfig(kfac="reduce", center_coef=0.1)


def test_posterior_records_the_pairs_it_was_fitted_on(trained: RewardModel, train_pairs: list[Pair],
                                                      tmp_path: Path) -> None:
    p = fit_laplace(trained, train_pairs[:10], LaplaceConfig(subset="head"))
    p.save(tmp_path / "post")
    q = LaplacePosterior.load(tmp_path / "post")
    assert q.fitted_fraction(train_pairs[:10]) == 1.0
    assert q.fitted_fraction(train_pairs[10:]) == 0.0
    assert q.fitted_fraction(train_pairs[5:15]) == 0.5
    assert q.data_fingerprint == p.data_fingerprint is not None


def test_lora_and_head_variances_from_one_pass_equal_two_passes(trained: RewardModel, train_pairs: list[Pair],
                                                                  post: LaplacePosterior) -> None:
    head = fit_laplace(trained, train_pairs, LaplaceConfig(subset="head"))
    ids = trained.encode([x.prompt for x in ID_PAIRS], [x.chosen for x in ID_PAIRS])
    mean, var, var_head = post.predict_ids_with_head(head, trained, ids, batch_size=3)
    m1, v1 = post.predict_ids(trained, ids, batch_size=5)
    m2, v2 = head.predict_ids(trained, ids, batch_size=5)
    torch.testing.assert_close(mean, m1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean, m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, v1, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(var_head, v2, rtol=1e-6, atol=1e-10)
    assert not torch.allclose(var, var_head)  # two different posteriors, not one computed twice
    with pytest.raises(ValueError, match="LoRA posterior with a head-only one"):
        head.predict_ids_with_head(post, trained, ids)


# ------------------------------------------------------------------------------------------------ fit_fraction


def test_subsampled_curvature_sums_are_unbiased_brute_force_over_subsets(trained: RewardModel,
                                                                          train_pairs: list[Pair]) -> None:
    """Mean over ALL C(6, 3) subsets of (n/m)·(curvature sum on the subset) = the full sum, exactly."""
    import itertools

    pairs, m = train_pairs[:6], 3
    G_full, _, ll_full = kfac_factors(trained, pairs, "pair", batch_size=6)
    H_full, hll_full = head_ggn(trained, pairs, batch_size=6)
    subsets = list(itertools.combinations(range(6), m))
    G_mean = {k: torch.zeros_like(v) for k, v in G_full.items()}
    H_mean, ll_mean, hll_mean = torch.zeros_like(H_full), 0.0, 0.0
    for idx in subsets:
        sub = [pairs[i] for i in idx]
        G, _, ll = kfac_factors(trained, sub, "pair", batch_size=6)
        H, hll = head_ggn(trained, sub, batch_size=6)
        for k in G:
            G_mean[k] += G[k] * (6 / m) / len(subsets)
        H_mean += H * (6 / m) / len(subsets)
        ll_mean, hll_mean = ll_mean + ll * (6 / m) / len(subsets), hll_mean + hll * (6 / m) / len(subsets)
    for k in G_full:
        torch.testing.assert_close(G_mean[k], G_full[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(H_mean, H_full, rtol=1e-9, atol=1e-12)
    assert math.isclose(ll_mean, ll_full, rel_tol=1e-9) and math.isclose(hll_mean, hll_full, rel_tol=1e-9)


@pytest.mark.parametrize("subset", ["lora", "head"])
def test_fit_fraction_scales_the_subsample_fit_to_the_whole_data(trained: RewardModel, train_pairs: list[Pair],
                                                                  subset: str) -> None:
    cfg = LaplaceConfig(subset=subset, tau_method="fixed", batch_size=5)
    part = fit_laplace(trained, train_pairs, replace(cfg, fit_fraction=0.4))
    sub = curvature_subsample(train_pairs, 0.4)
    assert len(sub) == math.ceil(0.4 * 24) and len({p.chosen + p.rejected for p in sub}) == len(sub)
    assert sub == curvature_subsample(train_pairs, 0.4)  # seeded
    alone = fit_laplace(trained, sub, cfg)  # the same pairs at fraction 1: its sums, unscaled
    scale = 24 / len(sub)
    assert math.isclose(part.log_lik, scale * alone.log_lik, rel_tol=1e-9)
    for k, b in part.blocks.items():  # the GGN's spectrum (G ⊗ A eigenvalues) is the subsample's, times n/m
        a = alone.blocks[k]
        torch.testing.assert_close(torch.outer(b.g_vals, b.a_vals), scale * torch.outer(a.g_vals, a.a_vals),
                                   rtol=1e-8, atol=1e-12)
    assert part.n_data == 24 and part.fitted_fraction(train_pairs) == 1.0  # the posterior is of all the data
    full = fit_laplace(trained, train_pairs, cfg)
    mean_p, var_p = part.predict(trained, [x.prompt for x in ID_PAIRS], [x.chosen for x in ID_PAIRS])
    mean_f, var_f = full.predict(trained, [x.prompt for x in ID_PAIRS], [x.chosen for x in ID_PAIRS])
    assert torch.equal(mean_p, mean_f) and not torch.allclose(var_p, var_f)  # an estimate, not the full fit
    with pytest.raises(ValueError, match="fit_fraction"):
        LaplaceConfig(fit_fraction=0.0)


def test_lora_on_a_per_row_module_is_handled(tiny_cfg: Callable[..., object]) -> None:
    """target_modules "dense" also puts LoRA on BERT's pooler, whose input is (B, d), not (B, T, d); the reward
    does not read it, so its Jacobian is 0 and the other tensors' are exact (before: a shape error in the fit)."""
    model = _model(tiny_cfg, "bert", target_modules=["query", "value", "dense"])
    mods = lora_modules(model)
    assert any("pooler" in k for k in mods)
    x, m = _batch(model, ["question 1 about cats", "what"], ["good kind", "great clear helpful correct short"])
    _r, a, g = batch_jacobians(model, mods, x, m)
    J = _jac(model, x, m)
    for k in mods:
        got = torch.einsum("bto,bti->boi", g[k], a[k])
        assert (float(got.abs().max()) == 0.0) if "pooler" in k else _rel(got, J[k]) < 1e-12, k
    post = fit_laplace(model, toy_pairs(6), LaplaceConfig(batch_size=3))
    _, var = post.predict(model, ["q"], ["a b c"])
    assert torch.isfinite(var).all() and float(var[0]) > 0
