"""Model merging and LwPTV against hand computations, dense oracles and peft's `cat`, on tiny backbones."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import toy_pairs
from typer.testing import CliRunner

from bayesrm.cli import app
from bayesrm.laplace import fit_laplace
from bayesrm.merge import (
    MERGE_LOG_NAME,
    LoraAdapter,
    MergeConfig,
    MergeMethod,
    apply_layer_masks,
    full_task_vectors,
    group_layers,
    layer_masks,
    layer_of,
    layer_saliency,
    lora_task_vectors,
    merge_adapters,
    merge_models,
    merge_task_vectors,
    read_member,
    rel_norm_saliency,
    save_merged,
    svd_factorise,
)
from bayesrm.model import RewardModel, RMConfig

Tensor = torch.Tensor
ALL_METHODS = [m.value for m in MergeMethod]
MODULES = [f"encoder.layer.{i}.attention.self.{n}" for i in range(3) for n in ("query", "value")]
PROMPTS = ["question 1 about cats", "question 2 about dogs", "question 3 about code"]
RESPONSES = ["good great kind", "bad awful rude vague", "clear correct"]


def _adapters(ranks: Sequence[int] = (2, 3, 2), d: int = 5, seed: int = 0) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    return [LoraAdapter({m: torch.randn(r, d, generator=g, dtype=torch.double) for m in MODULES},
                        {m: torch.randn(d, r, generator=g, dtype=torch.double) for m in MODULES}, scale=2.0 / r)
            for r in ranks]


def _dense(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {m: b[m] @ a[m] for m in a}


# ------------------------------------------------------------------------------------------------ pure maths


def test_layers_are_block_indices() -> None:
    assert layer_of("base_model.model.encoder.layer.3.attention.self.query") == "3"
    assert layer_of("model.layers.10.self_attn.q_proj.weight") == "10"
    assert layer_of("transformer.h.2.attn.c_attn") == "2"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert layer_of("encoder.layerx.3.q") == "encoder.layerx.3.q"
    groups = group_layers(["x.layers.10.q", "emb", "x.layers.2.q", "x.layers.2.v"])
    assert list(groups) == ["2", "10", "emb"] and groups["2"] == ["x.layers.2.q", "x.layers.2.v"]


def test_average_and_task_arithmetic_by_hand() -> None:
    tau = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    ta = merge_task_vectors(tau, MergeConfig(method="task_arithmetic", lam=0.5))["w"]
    assert torch.allclose(ta, torch.tensor([2.0, 1.0]))
    avg = merge_task_vectors(tau, MergeConfig(method="average", lam=7.0))["w"]  # λ is not used by average
    assert torch.allclose(avg, torch.tensor([2.0, 1.0]))
    avg_w = merge_task_vectors(tau, MergeConfig(method="average", weights=[3.0, 1.0]))["w"]
    assert torch.allclose(avg_w, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 4]))
    with pytest.raises(ValueError, match="non-negative"):
        merge_task_vectors(tau, MergeConfig(method="average", weights=[1.0, -1.0]))
    with pytest.raises(ValueError, match="2 weights for 3"):
        merge_task_vectors([*tau, tau[0]], MergeConfig(method="task_arithmetic", weights=[1.0, 1.0]))


def test_ties_by_hand() -> None:
    tau = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0, -0.2])},
           {"w": torch.tensor([-4.0, 0.1, 1.0, -0.3, 2.5])},
           {"w": torch.tensor([2.0, -3.0, 0.2, 1.0, 0.1])}]
    # trim to top-2 of 5 per task: [3,0,0,2,0], [-4,0,0,0,2.5], [2,-3,0,0,0]; elected signs of the sums
    # [1,-3,0,2,2.5] are [+,-,+,+,+]; disjoint means over agreeing non-zeros: (3+2)/2, -3, 0, 2, 2.5
    ties = merge_task_vectors(tau, MergeConfig(method="ties", density=0.4, lam=0.5))["w"]
    assert torch.allclose(ties, 0.5 * torch.tensor([2.5, -3.0, 0.0, 2.0, 2.5]))
    mp = merge_task_vectors(tau, MergeConfig(method="magnitude_prune", density=0.4))["w"]
    assert torch.allclose(mp, torch.tensor([1.0, -3.0, 0.0, 2.0, 2.5]))


def test_dare_is_seeded_rescaled_and_unbiased() -> None:
    tau = [{"w": torch.arange(1.0, 201.0)}, {"w": -0.5 * torch.arange(1.0, 201.0)}]
    cfg = MergeConfig(method="dare_linear", drop_rate=0.75, lam=1.0, seed=3)
    one = merge_task_vectors(tau[:1], cfg)["w"]
    assert set((one / tau[0]["w"]).unique().tolist()) <= {0.0, 4.0}  # dropped or rescaled by 1/(1−p)
    assert torch.equal(merge_task_vectors(tau, cfg)["w"], merge_task_vectors(tau, cfg)["w"])
    assert not torch.equal(merge_task_vectors(tau, cfg)["w"], merge_task_vectors(tau, replace(cfg, seed=4))["w"])
    mean = torch.stack([merge_task_vectors(tau, replace(cfg, seed=s))["w"] for s in range(400)]).mean(0)
    exact = merge_task_vectors(tau, replace(cfg, method="task_arithmetic"))["w"]
    assert abs(float((mean / exact).mean()) - 1) < 0.06  # E[DARE] = task arithmetic (sd of this mean ≈ 0.014)


def test_rel_norm_saliency_and_mask_rule_by_hand() -> None:
    layers = {"0": ["a", "b"], "1": ["c"]}
    base = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "c": torch.tensor([2.0])}  # ‖θ0^l‖ = 5, 2
    tau = [{"a": torch.tensor([1.0]), "b": torch.tensor([0.0]), "c": torch.tensor([1.0])},
           {"a": torch.tensor([0.0]), "b": torch.tensor([10.0]), "c": torch.tensor([0.5])}]
    s = rel_norm_saliency(tau, base, layers)
    assert torch.allclose(s, torch.tensor([[0.2, 0.5], [2.0, 0.25]], dtype=torch.double))
    assert layer_masks(s, 0.5).tolist() == [[False, True], [True, False]]  # each task prunes its least salient
    assert layer_masks(s, 0.0).all() and not layer_masks(s, 1.0).any()
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.9], [0.0, 0.5, 0.4, 0.1]])
    assert layer_masks(scores, 0.5).tolist() == [[True, False, False, True], [False, True, True, False]]
    with pytest.raises(ValueError, match="prune_ratio"):
        layer_masks(scores, 1.5)


def test_random_masks_have_the_same_sparsity_and_differ_by_seed() -> None:
    layers = {str(i): [str(i)] for i in range(12)}
    tau = [{str(i): torch.ones(1) for i in range(12)} for _ in range(4)]
    m0 = layer_masks(layer_saliency("random", tau, None, layers, seed=0), 1 / 3)
    m1 = layer_masks(layer_saliency("random", tau, None, layers, seed=1), 1 / 3)
    assert m0.sum(1).tolist() == [8] * 4 == m1.sum(1).tolist()
    assert not torch.equal(m0, m1)
    custom = layer_saliency(lambda t, b, ls: torch.arange(12.0).repeat(4, 1), tau, None, layers)
    assert layer_masks(custom, 0.25)[:, :3].sum() == 0 and layer_masks(custom, 0.25)[:, 3:].all()
    with pytest.raises(ValueError, match="shape"):
        layer_saliency(lambda t, b, ls: torch.zeros(2, 2), tau, None, layers)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_all_ones_masks_reproduce_the_method_and_all_zeros_give_theta0(method: str) -> None:
    tau = lora_task_vectors(_adapters())
    layers = group_layers(MODULES)
    cfg = MergeConfig(method=method, lam=0.7, density=0.3, drop_rate=0.4, seed=5)
    plain = merge_task_vectors(tau, cfg)
    ones = merge_task_vectors(tau, cfg, torch.ones(3, 3, dtype=torch.bool), layers)
    assert all(torch.equal(plain[m], ones[m]) for m in MODULES)
    zeros = merge_task_vectors(tau, cfg, torch.zeros(3, 3, dtype=torch.bool), layers)
    assert all(torch.count_nonzero(zeros[m]) == 0 for m in MODULES)
    # and the full-weight path: θ0 + Δ is θ0 bit for bit
    base = {m: torch.randn(5, 5, dtype=torch.double) for m in MODULES}
    tau_full = full_task_vectors([{m: base[m] + t[m] for m in MODULES} for t in tau], base)
    zeros_full = merge_task_vectors(tau_full, cfg, torch.zeros(3, 3, dtype=torch.bool), layers)
    assert all(torch.equal(base[m] + zeros_full[m], base[m]) for m in MODULES)


def test_masking_one_task_layer_moves_only_that_layer_by_minus_lambda_tau() -> None:
    tau = lora_task_vectors(_adapters())
    layers = group_layers(MODULES)
    cfg = MergeConfig(method="task_arithmetic", lam=0.6)
    masks = torch.ones(3, 3, dtype=torch.bool)
    masks[1, 2] = False  # task 1, layer 2
    full, pruned = merge_task_vectors(tau, cfg, torch.ones_like(masks), layers), merge_task_vectors(tau, cfg, masks,
                                                                                                   layers)
    for m in MODULES:
        expected = -0.6 * tau[1][m] if layer_of(m) == "2" else torch.zeros_like(tau[1][m])
        assert torch.allclose(pruned[m] - full[m], expected, atol=1e-12)
    assert apply_layer_masks(tau, masks, layers)[1][MODULES[-1]].count_nonzero() == 0


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_lora_concatenation_equals_the_dense_merge(method: str) -> None:
    ads = _adapters(ranks=(2, 3, 1))
    cfg = MergeConfig(method=method, weights=[0.5, 1.0, 2.0], lam=0.8, lwptv=True, prune_ratio=1 / 3)
    base = {m: torch.randn(5, 5, dtype=torch.double) for m in MODULES}
    res = merge_adapters(ads, cfg, base)
    assert res.rank == 6 and res.log["representation"] == "cat (exact)" and res.a[MODULES[0]].shape == (6, 5)
    masks = torch.tensor(res.log["masks"], dtype=torch.bool)
    assert masks.sum().item() == 6  # 1 of 3 layers pruned for each of 3 tasks
    dense = merge_task_vectors(lora_task_vectors(ads), cfg, masks, group_layers(MODULES))
    merged = _dense(res.a, res.b)
    assert all(torch.allclose(merged[m], dense[m], atol=1e-12) for m in MODULES)
    scores = rel_norm_saliency(lora_task_vectors(ads), base, group_layers(MODULES))
    assert torch.allclose(torch.tensor(res.log["saliency"]["scores"], dtype=torch.double), scores)


def test_svd_refactorisation_error_and_exact_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(6, 2, generator=g, dtype=torch.double) @ torch.randn(2, 7, generator=g, dtype=torch.double)
    a, b, err = svd_factorise(low, 3)
    assert a.shape == (3, 7) and b.shape == (6, 3) and err < 1e-12 and torch.allclose(b @ a, low)
    full = torch.randn(6, 7, generator=g, dtype=torch.double)
    _, _, err1 = svd_factorise(full, 1)
    s = torch.linalg.svdvals(full)
    assert err1 == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-9)  # Eckart–Young
    a0, b0, err0 = svd_factorise(torch.zeros(6, 7, dtype=torch.double), 3)
    assert err0 == 0.0 and torch.count_nonzero(a0) == 0 and torch.count_nonzero(b0) == 0
    res = merge_adapters(_adapters(), MergeConfig(method="ties", density=0.5), masks=torch.tensor(
        [[True, False, True]] * 3))
    assert res.rank == 7 and "svd" in res.log["representation"]
    assert all(torch.count_nonzero(res.b[m] @ res.a[m]) == 0 for m in MODULES if layer_of(m) == "1")
    assert all(0 <= e < 1 for e in res.log["svd_rel_error"].values())


# ------------------------------------------------------------------------------------------------ reward models


def _member(tiny_cfg: Callable[..., RMConfig], out: Path, seed: int, **kw: object) -> Path:
    """A saved tiny reward model whose LoRA B, A and head were moved away from init by seeded noise."""
    model = RewardModel(tiny_cfg("bert", template="plain", **kw))
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save(out)
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Callable[..., RMConfig]) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [_member(tiny_cfg, root / f"m{i}", i, lora_r=r, lora_alpha=2 * r) for i, r in enumerate((2, 3, 2))]


def _delta(model: RewardModel, module: str) -> Tensor:
    return model.backbone.base_model.model.get_submodule(module).get_delta_weight("default")


def test_merging_one_model_returns_it(members: list[Path]) -> None:
    ref = RewardModel.load(members[0]).score(PROMPTS, RESPONSES)
    for cfg in (MergeConfig(), MergeConfig(method="ties", density=1.0), MergeConfig(method="task_arithmetic")):
        merged, log = merge_models(members[:1], cfg)
        assert torch.allclose(merged.score(PROMPTS, RESPONSES), ref, atol=1e-5), cfg.method
        assert merged.config.lora_r == 2 and max(log["svd_rel_error"].values()) < 1e-5


def test_merged_model_is_the_dense_average_and_saves_like_any_model(members: list[Path], tmp_path: Path) -> None:
    mems = [read_member(p) for p in members]
    merged, log = merge_models(members)  # WARM average, cat representation
    assert merged.config.lora_r == merged.config.lora_alpha == 7
    for m in mems[0].adapter.a:
        dense = sum(read.adapter.scale * read.adapter.b[m] @ read.adapter.a[m] for read in mems) / 3
        assert torch.allclose(_delta(merged, m), dense, atol=1e-6)  # type: ignore[arg-type]
    heads = torch.stack([mm.head["weight"] for mm in mems]).mean(0)
    assert torch.allclose(merged.head.weight, heads, atol=1e-7)
    save_merged(merged, log, tmp_path / "merged")
    loaded = RewardModel.load(tmp_path / "merged")
    assert torch.allclose(loaded.score(PROMPTS, RESPONSES), merged.score(PROMPTS, RESPONSES), atol=1e-6)
    assert json.loads((tmp_path / "merged" / MERGE_LOG_NAME).read_text())["method"] == "average"
    assert loaded.config.extra["merge"]["members"] == [str(p) for p in members]


def test_cat_matches_peft_add_weighted_adapter(members: list[Path]) -> None:
    from bayesrm.ensemble import EnsembleRewardModel

    ens = EnsembleRewardModel.load(members[:2])
    ens.backbone.add_weighted_adapter(["member_0", "member_1"], [0.3, 0.7], "cat", combination_type="cat")
    res = merge_adapters([read_member(p).adapter for p in members[:2]], MergeConfig(weights=[0.3, 0.7]))
    inner = ens.backbone.base_model.model
    for m in res.a:
        layer = inner.get_submodule(m)
        assert torch.allclose(layer.lora_A["cat"].weight, res.a[m].float(), atol=1e-7)
        assert torch.allclose(layer.lora_B["cat"].weight, res.b[m].float(), atol=1e-7)


def test_pruned_layers_keep_the_pretrained_weights_exactly(members: list[Path], tmp_path: Path) -> None:
    def layer0_least(tau: object, base: object, layers: Mapping[str, list[str]]) -> Tensor:
        return torch.tensor([[0.0, 1.0]] * 3)  # every task's layer 0 is the least salient

    for method in ("ties", "average", "dare_linear"):
        cfg = MergeConfig(method=method, lwptv=True, prune_ratio=0.5, saliency=layer0_least)
        merged, log = merge_models(members, cfg)
        assert log["masks"] == [[0, 1]] * 3
        base = RewardModel.load(members[0])
        for name, mod in merged.backbone.base_model.model.named_modules():
            if name.endswith(("query", "value")):
                w0 = base.backbone.base_model.model.get_submodule(name).base_layer.weight
                assert torch.equal(mod.base_layer.weight, w0)
                pruned = ".layer.0." in name
                assert (torch.count_nonzero(_delta(merged, name)) == 0) == pruned, (method, name)
    with pytest.raises(ValueError, match="unknown Saliency 'paper'"):
        MergeConfig(saliency="paper")


def test_laplace_posterior_on_a_merged_model(members: list[Path]) -> None:
    merged, _ = merge_models(members, MergeConfig(method="ties", lwptv=True))
    post = fit_laplace(merged, toy_pairs(12))
    post.check_matches(merged)
    _, var = post.predict(merged, PROMPTS, RESPONSES)
    assert torch.isfinite(var).all() and (var > 0).all()


def test_refuses_other_backbones_and_warns_on_other_inits(members: list[Path], tiny_cfg: Callable[..., RMConfig],
                                                          tmp_path: Path) -> None:
    other = tiny_cfg("llama", template="plain")
    other_dir = tmp_path / "llama"
    RewardModel(other).save(other_dir)
    with pytest.raises(ValueError, match="differ in 'backbone'"):
        merge_models([members[0], other_dir])
    seed1 = _member(tiny_cfg, tmp_path / "seed1", 9, lora_seed=1)
    with pytest.warns(UserWarning, match="different LoRA/head initialisations"):
        merge_models([members[0], seed1])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_merge_and_errors(members: list[Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli_merged"
    res = runner.invoke(app, ["merge", *map(str, members), "--method", "ties", "--lwptv", "--saliency", "random",
                              "--density", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    log = json.loads((out / MERGE_LOG_NAME).read_text())
    assert log["method"] == "ties" and log["saliency"]["kind"] == "random" and len(log["masks"]) == 3
    assert RewardModel.load(out).score(PROMPTS, RESPONSES).isfinite().all()
    res = runner.invoke(app, ["merge", str(members[0]), "--method", "slerp", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error:" in res.output and "slerp" in res.output
    res = runner.invoke(app, ["merge", str(members[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "not a bayesrm model directory" in " ".join(res.output.split())
