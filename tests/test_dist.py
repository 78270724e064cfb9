"""Multi-process training, Laplace fitting and ensembles with 2 real gloo CPU processes (`torch.multiprocessing`, and
`torchrun` for the CLI), each checked against the one-process run it must reproduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import toy_pairs

from bayesrm import dist
from bayesrm.data import save_pairs
from bayesrm.laplace import LaplaceConfig, LaplacePosterior, fit_laplace, kfac_factors
from bayesrm.model import RewardModel, RMConfig
from bayesrm.train import MODEL_DIR, TrainConfig, local_share, train


def spawn(fn: Callable[..., None], *args: Any) -> None:
    """Run fn(*args) in 2 fresh processes joined in one gloo process group (as under torchrun)."""
    dist.run_local(fn, *args, processes=2, threads=1)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in RewardModel.load(run / MODEL_DIR).trainable_state().items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# --------------------------------------------------------------------------- collectives


def _collectives(out: str) -> None:
    rank = dist.world()[0]
    tree: dict[str, Any] = {"G": torch.full((2, 2), float(rank + 1)), "n": rank + 1.0,
                            "l": [torch.tensor([rank], dtype=torch.int64)]}
    summed = dist.all_reduce_sum(tree)
    with dist.solo():
        alone = dist.world()
    res = {"sum": summed["G"].tolist(), "n": summed["n"], "l": summed["l"][0].tolist(),
           "dtype": str(summed["l"][0].dtype), "gather": dist.gather(rank * 10),
           "bcast": dist.broadcast(f"from {rank}"), "shard": list(dist.shard(range(5))), "alone": alone,
           "spread": dist.spread(lambda k: f"{k}@{rank}", ["a", "b", "c"])}
    Path(out, f"r{rank}.json").write_text(json.dumps(res))


def test_collectives_two_processes(tmp_path: Path) -> None:
    spawn(_collectives, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2))
    assert r0["sum"] == r1["sum"] == [[3.0, 3.0], [3.0, 3.0]] and r0["n"] == r1["n"] == 3.0
    assert r0["l"] == [1] and r0["dtype"] == "torch.int64"
    assert r0["gather"] == r1["gather"] == [0, 10] and r0["bcast"] == r1["bcast"] == "from 0"
    assert r0["shard"] + r1["shard"] == [0, 1, 2, 3, 4] and r0["alone"] == r1["alone"] == [0, 1]
    assert r0["spread"] == r1["spread"] == {"a": "a@0", "b": "b@1", "c": "c@0"}  # every P-th key per rank


def test_one_process_helpers_are_identities() -> None:
    tree = {"a": torch.ones(2), "b": 1.5}
    assert dist.world() == (0, 1) and dist.all_reduce_sum(tree) is tree and dist.gather(3) == [3]
    assert list(dist.shard([1, 2, 3])) == [1, 2, 3] and dist.broadcast("x") == "x"
    assert local_share([5, 6, 7], 0, 2) == [5, 6] and local_share([5, 6, 7], 1, 2) == [7]
    assert local_share([5], 1, 2) == []


# --------------------------------------------------------------------------- training


def _train_worker(cfg: RMConfig, jobs: list[tuple[TrainConfig, str, int, int | None]]) -> None:
    """Train runs (config, out dir, pairs, step at which the first attempt dies or None) one after another."""
    for tc, out, n, kill_at in jobs:
        pairs, evals = toy_pairs(n), toy_pairs(6, seed=1)
        if kill_at is not None:
            def boom(step: int, _loss: float, kill_at: int = kill_at) -> None:
                if step == kill_at:
                    raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                train(RewardModel(cfg), pairs, tc, out, eval_pairs=evals, on_step=boom, show_progress=False)
        train(RewardModel(cfg), pairs, tc, out, eval_pairs=evals, resume=kill_at is not None, show_progress=False)


CASES = [(16, 1), (17, 2)]  # (pairs, grad_accum); 17: the last global batch has 1 pair and rank 1 none


def test_two_processes_with_batch_b_step_like_one_with_2b(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    cfg = tiny_cfg("bert")
    spawn(_train_worker, cfg, [(TrainConfig(epochs=2, batch_size=4, grad_accum=acc, lr=1e-2, checkpoint_every=0),
                                str(tmp_path / f"p2_{n}"), n, None) for n, acc in CASES])
    for n, acc in CASES:
        one = TrainConfig(epochs=2, batch_size=8, grad_accum=acc, lr=1e-2, checkpoint_every=0)
        hist = train(RewardModel(cfg), toy_pairs(n), one, tmp_path / f"p1_{n}", eval_pairs=toy_pairs(6, seed=1),
                     show_progress=False)
        p1, p2 = tmp_path / f"p1_{n}", tmp_path / f"p2_{n}"
        _close(_weights(p2), _weights(p1))
        assert any(not torch.equal(v, RewardModel(cfg).trainable_state()[k]) for k, v in _weights(p1).items())
        two = [json.loads(x) for x in (p2 / "metrics.jsonl").read_text().splitlines()]
        assert len(two) == len(hist) == 2
        for a, b in zip(two, hist, strict=True):  # global-batch loss and eval gathered over both ranks
            assert a["step"] == b["step"] and a["eval_n"] == b["eval_n"] == 6
            for k in ("train_loss", "eval_accuracy", "eval_nll"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
        assert json.loads((p2 / "train_config.json").read_text())["num_processes"] == 2


def test_two_process_resume_after_kill_is_exact(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    tc = TrainConfig(epochs=2, batch_size=2, lr=1e-2, checkpoint_every=2)
    spawn(_train_worker, tiny_cfg("bert"), [(tc, str(tmp_path / "resumed"), 16, 3),  # dies at step 3, resumes at 2
                                            (tc, str(tmp_path / "straight"), 16, None)])
    torch.testing.assert_close(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight"), rtol=0, atol=0)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["epoch"] == 2  # 16 pairs / (2 × 2) per step × 2 epochs


# --------------------------------------------------------------------------- Laplace

LAPLACE = [("pair", "lora"), ("expand", "lora"), ("pair", "head")]


def _laplace_worker(model_dir: str, n: int, out: str) -> None:
    model = RewardModel.load(model_dir).double()
    test = toy_pairs(5, seed=7)
    for kfac, subset in LAPLACE:
        dest = Path(out) / f"{kfac}_{subset}"
        dest.mkdir(parents=True, exist_ok=True)
        post = fit_laplace(model, toy_pairs(n), LaplaceConfig(batch_size=3, kfac=kfac, subset=subset))
        if subset == "lora":
            G, A, ll = kfac_factors(model, dist.shard(toy_pairs(n)), kfac, 3, reduce=dist.all_reduce_sum)
            if dist.is_main():
                torch.save({"G": G, "A": A, "ll": ll}, dest / "factors.pt")
        if dist.is_main():
            post.save(dest / "post")
        _, var = post.predict(model, [p.prompt for p in test], [p.chosen for p in test], batch_size=4)
        torch.save(var, dest / f"var{dist.world()[0]}.pt")


@pytest.fixture(scope="module")
def trained(tiny_cfg: Callable[..., RMConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_rm")
    train(RewardModel(tiny_cfg("bert")), toy_pairs(16), TrainConfig(max_steps=4, batch_size=4, lr=1e-2,
                                                                    checkpoint_every=0), out, show_progress=False)
    return out


def test_two_process_laplace_fit_equals_one_process(trained: Path, tmp_path: Path) -> None:
    n = 13  # odd: shards of 7 and 6 pairs, batches of 3 that split differently from one process
    one, two = tmp_path / "one", tmp_path / "two"
    _laplace_worker(str(trained), n, str(one))
    spawn(_laplace_worker, str(trained), n, str(two))
    for kfac, subset in LAPLACE:
        d1, d2 = one / f"{kfac}_{subset}", two / f"{kfac}_{subset}"
        p1, p2 = LaplacePosterior.load(d1 / "post"), LaplacePosterior.load(d2 / "post")
        assert p1.n_data == p2.n_data == n and p2.log_lik == pytest.approx(p1.log_lik, rel=1e-9)
        for k in p1.tau:
            assert p2.tau[k] == pytest.approx(p1.tau[k], rel=1e-6), (kfac, subset, k)
        if subset == "lora":
            f1, f2 = torch.load(d1 / "factors.pt"), torch.load(d2 / "factors.pt")
            for name in ("G", "A"):
                for k in f1[name]:
                    torch.testing.assert_close(f2[name][k], f1[name][k], rtol=1e-9, atol=1e-12)
        v1 = torch.load(d1 / "var0.pt")
        for r in range(2):  # every rank holds the whole posterior
            torch.testing.assert_close(torch.load(d2 / f"var{r}.pt"), v1, rtol=1e-6, atol=0)
        assert float(v1.min()) > 0


# --------------------------------------------------------------------------- ensembles


def _ensemble_worker(cfg: RMConfig, tc: TrainConfig, out: str, members: int, kill_member: int | None) -> None:
    from bayesrm import ensemble

    if kill_member is not None:  # the process training this member dies mid-way; the job restarts
        real = ensemble.train

        def dying(model: RewardModel, *a: Any, **kw: Any) -> Any:
            if model.config.extra.get("ensemble_member") == kill_member:
                kw["on_step"] = lambda step, _l: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None
            return real(model, *a, **kw)

        ensemble.train = dying  # this process is thrown away
    ensemble.train_ensemble(cfg, tc, toy_pairs(12), out, members=members, show_progress=False)


def test_ensemble_members_on_ranks_match_sequential_and_resume(tiny_cfg: Callable[..., RMConfig],
                                                               tmp_path: Path) -> None:
    from bayesrm.ensemble import MANIFEST_NAME, train_ensemble

    cfg = tiny_cfg("bert")
    tc = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, checkpoint_every=1)
    train_ensemble(cfg, tc, toy_pairs(12), tmp_path / "seq", members=3, show_progress=False)
    spawn(_ensemble_worker, cfg, tc, str(tmp_path / "par"), 3, None)
    for i in range(3):  # members 0, 1 on ranks 0, 1 at once, then member 2 on rank 0: same weights as sequential
        torch.testing.assert_close(_weights(tmp_path / "par" / f"member_{i}"),
                                   _weights(tmp_path / "seq" / f"member_{i}"), rtol=0, atol=0)
    man = json.loads((tmp_path / "par" / MANIFEST_NAME).read_text())
    assert [e["status"] for e in man["entries"]] == ["done"] * 3
    seq = json.loads((tmp_path / "seq" / MANIFEST_NAME).read_text())
    assert [e["final_metrics"] for e in man["entries"]] == [e["final_metrics"] for e in seq["entries"]]


@pytest.mark.slow
def test_ensemble_on_ranks_resumes_after_a_rank_dies(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    from bayesrm.ensemble import MANIFEST_NAME, train_ensemble

    cfg = tiny_cfg("bert")
    tc = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, checkpoint_every=1)
    train_ensemble(cfg, tc, toy_pairs(12), tmp_path / "seq", members=2, show_progress=False)
    # member 1 (rank 1) dies at its step 2: the manifest says running, a restart finishes it from its checkpoint
    out = tmp_path / "crash"
    with pytest.raises(mp.ProcessRaisedException):  # rank 1 dies (KeyboardInterrupt), the job ends
        spawn(_ensemble_worker, cfg, tc, str(out), 2, 1)
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert [e["status"] for e in man["entries"]] == ["running", "running"]
    spawn(_ensemble_worker, cfg, tc, str(out), 2, None)
    for i in range(2):
        torch.testing.assert_close(_weights(out / f"member_{i}"), _weights(tmp_path / "seq" / f"member_{i}"),
                                   rtol=0, atol=0)
    assert [e["status"] for e in json.loads((out / MANIFEST_NAME).read_text())["entries"]] == ["done", "done"]


# --------------------------------------------------------------------------- CLI under torchrun


@pytest.mark.slow
def test_cli_train_and_laplace_under_torchrun(tiny_cfg: Callable[..., RMConfig], tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    save_pairs(toy_pairs(16), data)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(dist.free_port()), "-m", "bayesrm"]
    backbone = tiny_cfg("bert").backbone
    args = ["train", str(data), "--out", str(tmp_path / "rm"), "--backbone", backbone, "--lora-r", "2",
            "--max-length", "64", "--batch-size", "4", "--lr", "1e-2", "--eval-frac", "0.25"]
    res = subprocess.run([*run, *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in 2 processes (global batch 8)" in " ".join(res.stderr.split())
    res = subprocess.run([*run, "laplace", str(tmp_path / "rm"), str(tmp_path / "rm" / "data" / "train.jsonl")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = LaplacePosterior.load(tmp_path / "rm" / "model")
    model = RewardModel.load(tmp_path / "rm")
    one = fit_laplace(model, [p for p in _read_pairs(tmp_path / "rm" / "data" / "train.jsonl")])
    assert two.log_lik == pytest.approx(one.log_lik, rel=1e-5)
    for k in one.tau:
        assert two.tau[k] == pytest.approx(one.tau[k], rel=1e-3), k


def _read_pairs(path: Path) -> list[Any]:
    from bayesrm.data import load_pairs

    return load_pairs(str(path))
