"""Tests for bayesrm.ensemble: seeded members, resumable manifest, multi-adapter scoring, per-member Laplace."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import toy_pairs
from safetensors.torch import load_file

import bayesrm.ensemble as ens_mod
from bayesrm.ensemble import EnsembleRewardModel, train_ensemble
from bayesrm.laplace import LaplaceConfig, fit_laplace
from bayesrm.model import RewardModel, RMConfig
from bayesrm.objectives import parse_spec
from bayesrm.run import MANIFEST_NAME, POSTERIOR_DIR
from bayesrm.train import TrainConfig

TC = TrainConfig(max_steps=3, batch_size=4, checkpoint_every=0)
PAIRS = toy_pairs(16)
PROMPTS = [p.prompt for p in PAIRS] * 2
RESPONSES = [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS]


def _trainable(member_dir: Path) -> dict[str, torch.Tensor]:
    """Final LoRA adapter + head weights of a member run directory."""
    d = member_dir / "model"
    return load_file(str(d / "adapter_model.safetensors")) | load_file(str(d / "head.safetensors"))


def _init(member_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(member_dir / "model" / "lora_init.safetensors"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spy(monkeypatch: pytest.MonkeyPatch, wrap: Callable[..., Any] | None = None) -> list[str]:
    """Record which member directories `train` is called for (optionally wrapping the call)."""
    calls: list[str] = []
    real = ens_mod.train

    def fake(model: RewardModel, pairs: Any, cfg: TrainConfig, out_dir: Path, **kw: Any) -> Any:
        calls.append(Path(out_dir).name)
        if wrap is not None:
            return wrap(real, model, pairs, cfg, out_dir, **kw)
        return real(model, pairs, cfg, out_dir, **kw)

    monkeypatch.setattr(ens_mod, "train", fake)
    return calls


@pytest.fixture(scope="module")
def ens_dir(tiny_cfg: Callable[..., RMConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 2-member ensemble: (lora_seed, data_seed) = (0, 0) and (1, 1)."""
    out = tmp_path_factory.mktemp("ens")
    train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=2, show_progress=False)
    return out


# ------------------------------------------------------------------------------------------------ training


def test_manifest_and_members_differ(ens_dir: Path) -> None:
    man = json.loads((ens_dir / MANIFEST_NAME).read_text())
    assert [(e["name"], e["lora_seed"], e["data_seed"], e["status"]) for e in man["entries"]] == [
        ("member_0", 0, 0, "done"), ("member_1", 1, 1, "done")]
    assert man["members"] == 2 and man["train"]["max_steps"] == 3 and len(man["data_sha256"]) == 64
    assert not _equal(_init(ens_dir / "member_0"), _init(ens_dir / "member_1"))
    a, b = _trainable(ens_dir / "member_0"), _trainable(ens_dir / "member_1")
    assert all(not torch.equal(a[k], b[k]) for k in a if k != "bias")  # BT is shift-invariant: head bias stays 0
    cfg = json.loads((ens_dir / "member_1" / "model" / "bayesrm.json").read_text())
    assert cfg["lora_seed"] == 1 and cfg["extra"] == {"ensemble_member": 1, "data_seed": 1}
    # training moved the weights away from initialisation
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)
    s0 = RewardModel.load(ens_dir / "member_0").score(PROMPTS, RESPONSES)
    s1 = RewardModel.load(ens_dir / "member_1").score(PROMPTS, RESPONSES)
    assert not torch.allclose(s0, s1)


def test_seeds_are_separately_settable(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    train_ensemble(tiny_cfg("bert"), TC, PAIRS, tmp_path, members=3, lora_seeds=[5, 5, 6], data_seeds=[0, 1, 0],
                   show_progress=False)
    m = [tmp_path / f"member_{i}" for i in range(3)]
    assert _equal(_init(m[0]), _init(m[1]))  # same LoRA init …
    w0, w1, w2 = (_trainable(d) for d in m)
    assert torch.equal(RewardModel.load(m[0]).lora_init[next(iter(_init(m[0])))], next(iter(_init(m[1]).values())))
    assert not _equal(w0, w1)  # … but a different data order gives different weights
    assert not _equal(_init(m[0]), _init(m[2]))  # different init with the same data order
    assert not _equal(w0, w2)


def test_rerun_with_same_seeds_reproduces_exactly(ens_dir: Path, tiny_cfg: Callable[..., RMConfig],
                                                 tmp_path: Path) -> None:
    train_ensemble(tiny_cfg("bert"), TC, PAIRS, tmp_path, members=1, lora_seeds=[1], data_seeds=[1],
                   show_progress=False)
    assert _equal(_trainable(tmp_path / "member_0"), _trainable(ens_dir / "member_1"))
    assert _equal(_init(tmp_path / "member_0"), _init(ens_dir / "member_1"))


def test_manifest_resume_skips_finished_members(ens_dir: Path, tiny_cfg: Callable[..., RMConfig], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ens"
    shutil.copytree(ens_dir, out)
    before = (out / "member_0" / "model" / "adapter_model.safetensors").stat().st_mtime_ns
    calls = _spy(monkeypatch)
    dirs = train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=2, show_progress=False)
    assert calls == [] and dirs == [out / "member_0", out / "member_1"]
    train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=3, show_progress=False)  # grow the ensemble
    assert calls == ["member_2"]
    assert (out / "member_0" / "model" / "adapter_model.safetensors").stat().st_mtime_ns == before
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert [e["status"] for e in man["entries"]] == ["done"] * 3 and man["members"] == 3
    assert man["entries"][2]["lora_seed"] == 2 and "train_loss" in man["entries"][2]["final_metrics"]
    with pytest.raises(ValueError, match="different 'train'"):
        train_ensemble(tiny_cfg("bert"), TrainConfig(max_steps=4, batch_size=4), PAIRS, out, members=3)
    with pytest.raises(ValueError, match="different 'data_sha256'"):
        train_ensemble(tiny_cfg("bert"), TC, PAIRS[:8], out, members=3)
    with pytest.raises(ValueError, match="lora_seed=1"):
        train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=3, lora_seeds=[0, 7, 2])
    with pytest.raises(ValueError, match="more than"):
        train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=2)
    with pytest.raises(ValueError, match="2 seeds for 3 members"):
        train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=3, data_seeds=[0, 1])
    assert calls == ["member_2"]


def test_a_manifest_written_before_a_new_config_field_still_resumes(ens_dir: Path, tiny_cfg: Callable[..., RMConfig],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An ensemble saved before RMConfig.seq_cls (and a TrainConfig field) existed grows instead of being refused
    (before: "trained with a different 'model'" because the old manifest lacked the new keys)."""
    out = tmp_path / "ens"
    shutil.copytree(ens_dir, out)
    man = json.loads((out / MANIFEST_NAME).read_text())
    del man["model"]["seq_cls"], man["train"]["group_by_length"]  # both at their defaults in this ensemble
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    calls = _spy(monkeypatch)
    train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=3, show_progress=False)
    assert calls == ["member_2"]
    man["model"]["max_length"] += 1  # a real difference is still refused
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="different 'model'"):
        train_ensemble(tiny_cfg("bert"), TC, PAIRS, out, members=3, show_progress=False)


class _Interrupt(Exception):
    pass


def test_interrupted_member_resumes_from_checkpoint(ens_dir: Path, tiny_cfg: Callable[..., RMConfig],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tc = TrainConfig(max_steps=3, batch_size=4, checkpoint_every=1)
    steps: list[list[int]] = []

    def stop_at_2(real: Any, *args: Any, **kw: Any) -> Any:
        steps.append([])

        def on_step(step: int, _loss: float) -> None:
            steps[-1].append(step)
            if step == 2 and len(steps) == 1:
                raise _Interrupt
        return real(*args, on_step=on_step, **kw)

    _spy(monkeypatch, stop_at_2)
    with pytest.raises(_Interrupt):
        train_ensemble(tiny_cfg("bert"), tc, PAIRS, tmp_path, members=1, show_progress=False)
    man = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert man["entries"][0]["status"] == "running"
    with pytest.raises(ValueError, match="not trained"):
        EnsembleRewardModel.load(tmp_path)
    train_ensemble(tiny_cfg("bert"), tc, PAIRS, tmp_path, members=1, show_progress=False)
    assert steps[0] == [1, 2] and steps[1][0] > 1 and steps[1][-1] == 3  # resumed, not restarted
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["entries"][0]["status"] == "done"
    # same weights as the uninterrupted member 0 of the fixture (same seeds; checkpoints don't change training)
    assert _equal(_trainable(tmp_path / "member_0"), _trainable(ens_dir / "member_0"))


# ------------------------------------------------------------------------------------------------ multi-adapter


def test_multi_adapter_scores_equal_single_models(ens_dir: Path) -> None:
    ens = EnsembleRewardModel.load(ens_dir)
    assert len(ens) == 2 and ens.names == ["member_0", "member_1"]
    # one backbone: the embedding matrix exists once; adapters and heads once per member
    names = [n for n, _ in ens.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 1
    assert sum(".lora_A.member_1." in n for n in names) == sum(".lora_A.member_0." in n for n in names) > 0
    scores = ens.score_members(PROMPTS, RESPONSES, batch_size=5)  # (M, N)
    assert scores.shape == (2, len(PROMPTS))
    for i in range(2):
        single = RewardModel.load(ens_dir / f"member_{i}").score(PROMPTS, RESPONSES)
        torch.testing.assert_close(scores[i], single, rtol=0, atol=1e-5)
        torch.testing.assert_close(ens.member(i).score(PROMPTS, RESPONSES), single, rtol=0, atol=1e-5)
    # the same members listed explicitly, in another order
    swapped = EnsembleRewardModel.load([ens_dir / "member_1", ens_dir / "member_0"]).score_members(PROMPTS, RESPONSES)
    torch.testing.assert_close(swapped, scores.flip(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "neox", "llama"])
def test_multi_adapter_untrained_backbones(kind: str, tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    dirs = []
    for i in range(3):
        m = RewardModel(tiny_cfg(kind, lora_seed=i))
        with torch.no_grad():  # LoRA B starts at 0; give every member a non-trivial adapter
            for n, p in m.lora_parameters().items():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(i))
        m.save(tmp_path / f"member_{i}")
        dirs.append(tmp_path / f"member_{i}")
    ens = EnsembleRewardModel.load(tmp_path)  # member_* folders without a manifest
    scores = ens.score_members(PROMPTS, RESPONSES, batch_size=8)
    for i, d in enumerate(dirs):
        torch.testing.assert_close(scores[i], RewardModel.load(d).score(PROMPTS, RESPONSES), rtol=0, atol=1e-5)
    assert not torch.allclose(scores[0], scores[1])


def test_predict_members_matches_single_laplace(ens_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens"
    shutil.copytree(ens_dir, out)
    ref = []
    for i in range(2):
        single = RewardModel.load(out / f"member_{i}")
        post = fit_laplace(single, PAIRS, LaplaceConfig(batch_size=8))
        post.save(out / f"member_{i}" / POSTERIOR_DIR)
        ref.append(post.predict(single, PROMPTS, RESPONSES))
    ens = EnsembleRewardModel.load(out)
    means, variances = ens.predict_members(None, PROMPTS, RESPONSES)  # (M, N) each, posteriors from disk
    assert means.shape == variances.shape == (2, len(PROMPTS))
    for i in range(2):
        torch.testing.assert_close(means[i], ref[i][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(variances[i], ref[i][1], rtol=1e-4, atol=1e-9)
    assert (variances > 0).all()
    torch.testing.assert_close(means.float(), ens.score_members(PROMPTS, RESPONSES), rtol=0, atol=1e-5)
    # LA-Ens of one member is that member's LA reward
    la = parse_spec("la:var:k=1").apply(means[:1], variances[:1])
    torch.testing.assert_close(parse_spec("la-ens:var:k=1").apply(means[:1], variances[:1]), la)
    # head-only (last-layer) posteriors, passed as objects, map onto the members' heads
    heads = [fit_laplace(RewardModel.load(out / f"member_{i}"), PAIRS, LaplaceConfig(subset="head")) for i in range(2)]
    hm, hv = ens.predict_members(heads, PROMPTS, RESPONSES)
    for i in range(2):
        single = RewardModel.load(out / f"member_{i}")
        rm, rv = heads[i].predict(single, PROMPTS, RESPONSES)
        torch.testing.assert_close(hm[i], rm, rtol=0, atol=1e-5)
        torch.testing.assert_close(hv[i], rv, rtol=1e-4, atol=1e-9)
    # a posterior that is not this member's MAP is refused
    with pytest.raises(ValueError, match="differ from the posterior's MAP"):
        ens.predict_members([out / "member_1" / POSTERIOR_DIR, out / "member_0" / POSTERIOR_DIR], PROMPTS, RESPONSES)


def test_load_errors(ens_dir: Path, tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    RewardModel(tiny_cfg("bert", max_length=32)).save(tmp_path / "short")
    with pytest.raises(ValueError, match="differ in 'max_length'"):
        EnsembleRewardModel.load([ens_dir / "member_0", tmp_path / "short"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ensemble members"):
        EnsembleRewardModel.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a bayesrm model"):
        EnsembleRewardModel.load([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no Laplace posterior"):
        EnsembleRewardModel.load(ens_dir).predict_members(None, PROMPTS[:2], RESPONSES[:2])


def test_bnrm_members_are_refused_with_a_clear_error(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    for i in range(2):
        RewardModel(tiny_cfg("bert", head="bnrm", bnrm={"k": 4}, lora_seed=i)).save(tmp_path / f"member_{i}" / "model")
    with pytest.raises(ValueError, match="'bnrm' heads are not supported"):
        EnsembleRewardModel.load(tmp_path)
