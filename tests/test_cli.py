"""The typer CLI end to end on a tiny backbone: train → laplace → eval → score, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import toy_pairs
from typer.testing import CliRunner

from bayesrm.cli import app

runner = CliRunner()


def _write_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in toy_pairs(n, seed)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dir: dict[str, str]) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    data = _write_pairs(tmp / "train.jsonl", 32)
    run = tmp / "run"
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--backbone", tiny_dir["bert"],
                              "--max-length", "48", "--lora-r", "2", "--lora-alpha", "4", "--epochs", "2",
                              "--lr", "1e-2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["laplace", str(run)])  # default: the training split `train` saved
    assert res.exit_code == 0, res.output
    return run, data


def test_laplace_fits_the_saved_training_split_and_eval_warns_in_sample(trained: tuple[Path, Path]) -> None:
    """Before: the posterior was fitted on whatever file was given (the README used the whole file, eval split
    included) and eval never noticed."""
    from bayesrm.data import load_pairs
    from bayesrm.laplace import LaplacePosterior

    run, _data = trained
    post = LaplacePosterior.load(run)
    assert post.fitted_fraction(load_pairs(run / "data" / "train.jsonl")) == 1.0
    assert post.fitted_fraction(load_pairs(run / "data" / "eval.jsonl")) == 0.0
    res = runner.invoke(app, ["eval", str(run), str(run / "data" / "train.jsonl")])
    assert res.exit_code == 0 and "100% of the pairs" in res.output and "in-sample" in res.output
    res = runner.invoke(app, ["eval", str(run), str(run / "data" / "eval.jsonl")])
    assert res.exit_code == 0 and "in-sample" not in res.output


def test_train_writes_model_metrics_and_checkpoint(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    assert (run / "model" / "bayesrm.json").exists() and (run / "checkpoint" / "state.json").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "eval_accuracy" in rows[-1]
    assert (run / "model" / "laplace" / "posterior.json").exists()
    n_train = len((run / "data" / "train.jsonl").read_text().splitlines())
    n_eval = len((run / "data" / "eval.jsonl").read_text().splitlines())
    assert n_train + n_eval == 32 and n_eval > 0


def test_eval_reports_map_and_laplace_with_ood(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import math

    import numpy as np

    run, data = trained
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"prompt": f"zzz {i} " * 20, "chosen": "qqq xxx " * (i + 3), "rejected": "vvv"})
                           + "\n" for i in range(4)))
    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval", str(run), str(data), "--ood", str(ood), "--out", str(out), "--n-boot", "20",
                              "--levels", "0.5,0.9"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    test = [p for p in preds if p["split"] == "test"]
    assert row["map_n"] == len(test) == 32
    assert row["map_accuracy"] == pytest.approx(np.mean([p["correct"] for p in test]))
    assert row["bayes_nll"] == pytest.approx(np.mean([-math.log(p["p_bayes"]) for p in test]))
    s_id = [p["var_delta"] for p in test]
    s_ood = [p["var_delta"] for p in preds if p["split"] == "ood"]
    brute = np.mean([float(a > b) + 0.5 * (a == b) for a in s_ood for b in s_id])
    assert row["ood_auroc_sigma_delta"] == pytest.approx(brute)
    assert set(k for k in row if "coverage" in k) == {"map_coverage_0.5", "map_coverage_0.9", "bayes_coverage_0.5",
                                                      "bayes_coverage_0.9"}
    assert (out / "reliability.png").exists() and "## Interval coverage" in (out / "report.md").read_text()
    assert "in-sample" in res.output  # the posterior was fitted on these very pairs
    from bayesrm.data import load_pairs
    from bayesrm.laplace import LaplacePosterior
    from bayesrm.metrics import auroc
    from bayesrm.model import RewardModel

    model, post = RewardModel.load(run), LaplacePosterior.load(run)

    def sigma(path: Path) -> np.ndarray:
        ps = load_pairs(path)
        _, v = post.predict(model, [p.prompt for p in ps] * 2, [p.chosen for p in ps] + [p.rejected for p in ps])
        return v.sqrt().numpy()

    assert row["ood_auroc_sigma_response"] == pytest.approx(auroc(sigma(ood), sigma(data)))
    res = runner.invoke(app, ["eval", str(run), str(data), "--levels", "0.9,1.5", "--out", str(out)])
    assert res.exit_code == 2 and "levels" in res.output and "Traceback" not in res.output


def test_score_with_uncertainty_adds_columns(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": "question 1 about cats", "response": r}) + "\n"
                           for r in ["good great", "bad awful", "kind clear correct"]))
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["score", str(run), str(inp), "--out", str(out), "--uncertainty", "--penalty", "std",
                              "--k", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["reward_std"] > 0
        assert r["reward_penalized"] == pytest.approx(r["reward"] - 2 * r["reward_std"], rel=1e-6, abs=1e-9)
        assert r["penalty"].startswith("la:std")
    plain = tmp_path / "plain.jsonl"
    res = runner.invoke(app, ["score", str(run), str(inp), "--out", str(plain)])
    assert res.exit_code == 0, res.output
    p_rows = [json.loads(x) for x in plain.read_text().splitlines()]
    assert [r["reward"] for r in p_rows] == pytest.approx([r["reward"] for r in rows], abs=1e-5)


def test_bad_input_gives_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3, "rejected": "b"}\n')
    res = runner.invoke(app, ["train", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "bad.jsonl:2" in res.output and "chosen" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["score", str(tmp_path / "nope"), str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, ["train", str(bad), "--field", "prompt"])
    assert res.exit_code == 2 and "NAME=COLUMN" in res.output


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "eval", "score", "laplace", "bon", "demo", "sample"):
        assert cmd in res.output


def test_train_exposes_every_train_config_field_with_its_default(tmp_path: Path, tiny_dir: dict[str, str]) -> None:
    from dataclasses import fields

    import typer.main

    from bayesrm.config import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}  # type: ignore[attr-defined]
    for f in fields(TrainConfig):
        assert f.name in params, f"TrainConfig.{f.name} is not a `bayesrm train` option"
        assert params[f.name].default == f.default, f.name
    data = _write_pairs(tmp_path / "p.jsonl", 16)
    res = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "r"), "--backbone", tiny_dir["bert"],
                              "--max-length", "32", "--lora-r", "2", "--batch-size", "4", "--max-steps", "3",
                              "--checkpoint-every", "2", "--weight-decay", "0.01", "--no-group-by-length"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())["train"]
    assert (saved["checkpoint_every"], saved["weight_decay"], saved["group_by_length"]) == (2, 0.01, False)


@pytest.mark.parametrize("args", [["--help"], ["laplace", "--help"], ["train", "--help"], ["score", "--bogus"]])
def test_help_and_argument_errors_do_not_import_torch(args: list[str]) -> None:
    """`--help` and argument errors return before any heavy import (they took ~4 s of CPU importing torch)."""
    import subprocess
    import sys

    code = ("import sys\nfrom bayesrm.cli import app\ntry:\n    app(" + repr(args) + ")\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nassert 'transformers' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_laplace_defaults_come_from_the_config() -> None:
    from bayesrm.config import LaplaceConfig

    res = runner.invoke(app, ["laplace", "--help"], env={"COLUMNS": "200"})
    d = LaplaceConfig()
    assert res.exit_code == 0 and f"[default: {d.kfac}]" in res.output and f"[default: {d.tau_method}]" in res.output


# --------------------------------------------------------------------------- checks before heavy work, --set


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cmd", "config", "item", "message"), [
    ("bon", "examples/bon.toml", "stepz=2", "--set stepz=2: unknown field 'stepz'"),
    ("bon", "examples/bon.toml", "model.max_length=long", "--set model.max_length=long: expected int, got 'long'"),
    ("rlhf", "examples/rlhf.toml", "steps=2.5", "--set steps=2.5: expected int, got 2.5"),
    ("rlhf", "configs/rlhf_cpu.toml", "policy.nope=1", "--set policy.nope=1: unknown field 'policy.nope'"),
])
def test_set_overrides_fail_with_one_line(cmd: str, config: str, item: str, message: str) -> None:
    res = runner.invoke(app, [cmd, str(ROOT / config), "--set", item, "--out", "unused"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def _forbid(monkeypatch: pytest.MonkeyPatch, target: str, what: str) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError(f"{what} ran before the inputs were checked")
    monkeypatch.setattr(target, boom)


@pytest.mark.parametrize("broken", ["gold", "prompts", "posterior"])
def test_rlhf_checks_proxy_gold_and_prompts_before_converting_the_policy(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Before: a missing gold model was found only after ~50 s of converting the policy's GGUF weights."""
    import shutil

    _forbid(monkeypatch, "bayesrm.rlhf.run.policy_path", "the policy conversion")
    run, data = trained
    fields = {"proxy": str(run), "gold": str(run), "prompts": str(data)}
    if broken == "gold":
        fields["gold"], message = str(tmp_path / "gold"), f"gold {tmp_path / 'gold'}: not a trained bayesrm model"
    elif broken == "prompts":
        fields["prompts"], message = str(tmp_path / "p.jsonl"), f"{tmp_path / 'p.jsonl'}: prompts file not found"
    else:  # a proxy without its posterior, for the la run
        shutil.copytree(run / "model", tmp_path / "bare", ignore=shutil.ignore_patterns("laplace"))
        fields["proxy"], message = str(tmp_path / "bare"), "no Laplace posterior for spec 'la:var:k=1'"
    cfg = tmp_path / "rlhf.toml"
    cfg.write_text("".join(f'{k} = "{v}"\n' for k, v in fields.items())
                   + 'exclude = []\nproxy_sigma = false\n[runs]\nmap = "map"\nla = "la:var:k=1"\n')
    res = runner.invoke(app, ["rlhf", str(cfg), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output  # rich wraps long lines


def test_eval_checks_every_input_before_loading_the_model(trained: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the model loaded (and ID pairs were scored) before a bad --ood file was read."""
    _forbid(monkeypatch, "bayesrm.model.RewardModel.load", "the model load")
    run, _ = trained
    bad = tmp_path / "ood.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "", "rejected": "b"}\n')
    res = runner.invoke(app, ["eval", str(run), str(run / "data" / "eval.jsonl"), "--ood", str(bad)])
    out = "".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2 and f"{bad}:2".replace(" ", "") in out and "chosen" in out, res.output
