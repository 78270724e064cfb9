"""Fault injection: every damaged or mismatched artifact, bad output path and bad input file ends in exit code 2
and ONE line naming the user's file, never a number (issue 16)."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import toy_pairs
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bayesrm.cli import app
from bayesrm.data import DataError, load_pairs
from bayesrm.integrity import UnverifiedArtifactWarning, file_sha256
from bayesrm.io import atomic_dir, atomic_write_json, atomic_write_text, write_jsonl
from bayesrm.laplace import LaplaceConfig, LaplacePosterior, fit_laplace
from bayesrm.model import RewardModel, RMConfig
from bayesrm.run import POSTERIOR_DIR

runner = CliRunner()
PAIRS = toy_pairs(12)


def _pairs_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in PAIRS))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Callable[..., RMConfig]) -> Path:
    """root/run (model + LoRA posterior), root/other (another model's posterior), pairs and score inputs."""
    root = tmp_path_factory.mktemp("integrity")
    for name, seed in (("run", 0), ("other", 1)):
        model = RewardModel(tiny_cfg("bert", lora_seed=seed))
        with torch.no_grad():  # a non-zero B so that the LoRA MAP differs between the two models
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        model.save(root / name / "model")
        fit_laplace(model, PAIRS, LaplaceConfig(batch_size=6)).save(root / name / "model" / POSTERIOR_DIR)
    _pairs_file(root / "pairs.jsonl")
    (root / "in.jsonl").write_text("".join(json.dumps({"prompt": "question 1 about cats", "response": r}) + "\n"
                                           for r in ["good great", "bad awful"]))
    return root


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pristine run to damage."""
    shutil.copytree(pristine, tmp_path / "c")
    return tmp_path / "c"


def _one_line_error(args: Sequence[object], *names: object) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    for n in names:
        assert str(n) in errors[0], errors[0]
    assert ".tmp" not in errors[0]
    return errors[0]


def _score(run: Path, spec: str = "la:var:k=1") -> list[object]:
    return ["score", run / "run", run / "in.jsonl", "--out", run / "out.jsonl", "--spec", spec]


def _flip_last_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[-1] ^= 0x5A
    path.write_bytes(bytes(b))


def _edit_json(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _old_format(run: Path) -> None:
    """Strip the checksums, as in an artifact written before they were recorded."""
    for meta in (run / "run" / "model" / "bayesrm.json", run / "run" / "model" / POSTERIOR_DIR / "posterior.json"):
        _edit_json(meta, lambda d: d.pop("checksums"))


def _edit_tensor(path: Path, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    t = load_file(str(path))
    t[key] = fn(t[key])
    save_file(t, str(path))


def _post(run: Path) -> Path:
    return run / "run" / "model" / POSTERIOR_DIR


# --------------------------------------------------------------------------- posterior


def test_pristine_run_scores_and_checksums_are_recorded(run: Path) -> None:
    res = runner.invoke(app, [str(a) for a in _score(run)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "out.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["reward_std"]) and r["reward_std"] > 0 for r in rows)
    meta = json.loads((_post(run) / "posterior.json").read_text())
    assert meta["checksums"] == {"posterior.safetensors": file_sha256(_post(run) / "posterior.safetensors")}
    cfg = json.loads((run / "run" / "model" / "bayesrm.json").read_text())
    assert set(cfg["checksums"]) == {"adapter_model.safetensors", "head.safetensors", "lora_init.safetensors"}


def test_flipped_byte_in_posterior_tensors(run: Path) -> None:
    _flip_last_byte(_post(run) / "posterior.safetensors")
    _one_line_error(_score(run), _post(run) / "posterior.safetensors", "checksum mismatch")
    _one_line_error(["eval", run / "run", run / "pairs.jsonl"], _post(run) / "posterior.safetensors")
    assert not (run / "out.jsonl").exists()


@pytest.mark.parametrize("tau", ["-1.0", "0.0", "NaN", "Infinity", '"x"', "null"])
def test_bad_tau_in_posterior_json(run: Path, tau: str) -> None:
    meta = _post(run) / "posterior.json"
    d = json.loads(meta.read_text())
    d["tau"][next(iter(d["tau"]))] = "TAU"
    meta.write_text(json.dumps(d).replace('"TAU"', tau))  # the literal as it would sit in the file
    _one_line_error(_score(run), meta, "tau", "finite number > 0")


def test_old_posterior_without_checksums_loads_with_a_warning(run: Path) -> None:
    _old_format(run)
    with pytest.warns(UnverifiedArtifactWarning, match="bayesrm.json: no checksums"):
        model = RewardModel.load(run / "run")
    with pytest.warns(UnverifiedArtifactWarning, match="posterior.json: no checksums"):
        post = LaplacePosterior.load(_post(run), model)
    fresh = fit_laplace(model, PAIRS, LaplaceConfig(batch_size=6))
    _, v = post.predict(model, ["q"], ["good"])
    _, v_fresh = fresh.predict(model, ["q"], ["good"])
    assert torch.allclose(v, v_fresh, rtol=1e-6)


@pytest.mark.parametrize(("key", "fn", "message"), [
    ("0.a_vals", lambda t: t.clone().fill_(float("nan")), "NaN or infinite"),
    ("0.g_vecs", lambda t: t.clone().fill_(float("inf")), "NaN or infinite"),
    ("0.a_vals", lambda t: -t - 1.0, "negative curvature eigenvalues"),
    ("0.theta", lambda t: t[:, :-1].contiguous(), "inconsistent tensor shapes"),
])
def test_unverifiable_posterior_is_still_validated(run: Path, key: str, fn: Callable[[torch.Tensor], torch.Tensor],
                                                   message: str) -> None:
    _old_format(run)
    _edit_tensor(_post(run) / "posterior.safetensors", key, fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedArtifactWarning)
        _one_line_error(_score(run), _post(run) / "posterior.safetensors", message)


def test_negative_rho_and_malformed_posterior_json(run: Path) -> None:
    meta = _post(run) / "posterior.json"
    _edit_json(meta, lambda d: next(iter(d["blocks"].values())).update(g_rho=-0.5))
    _one_line_error(_score(run), meta, "g_rho")
    meta.write_text('{"blocks": ')
    _one_line_error(_score(run), meta, "malformed")


def test_posterior_of_another_model_is_refused_on_every_path(run: Path) -> None:
    shutil.rmtree(_post(run))
    shutil.copytree(run / "other" / "model" / POSTERIOR_DIR, _post(run))
    _one_line_error(_score(run), _post(run), "differ from the posterior's MAP")
    _one_line_error(["eval", run / "run", run / "pairs.jsonl"], _post(run), "differ from the posterior's MAP")
    with pytest.raises(DataError, match="differ"):
        LaplacePosterior.load(_post(run), RewardModel.load(run / "run"))


def test_posterior_checks_the_head_too(run: Path) -> None:
    """A LoRA posterior's σ depends on the head: a model whose head changed no longer matches it."""
    model = RewardModel.load(run / "run")
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    model.save(run / "run" / "model2")
    shutil.copytree(_post(run), run / "run" / "model2" / POSTERIOR_DIR)
    _one_line_error(["score", run / "run" / "model2", run / "in.jsonl", "--out", run / "o.jsonl", "--spec",
                     "la:var:k=1"], "head differs")


# --------------------------------------------------------------------------- model weights


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "head.safetensors", "lora_init.safetensors"])
def test_flipped_byte_in_model_weights(run: Path, name: str) -> None:
    _flip_last_byte(run / "run" / "model" / name)
    _one_line_error(_score(run, "map"), run / "run" / "model" / name, "checksum mismatch")


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "head.safetensors"])
def test_truncated_or_garbled_safetensors(run: Path, name: str, damage: str) -> None:
    _old_format(run)  # no checksum to catch it first: the loader itself must name the file
    f = run / "run" / "model" / name
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garble": b"\x10\x00" + os.urandom(64), "empty": b""}[damage])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedArtifactWarning)
        _one_line_error(_score(run, "map"), f, "not a readable safetensors file")


def test_nan_in_unverified_head_weights(run: Path) -> None:
    _old_format(run)
    _edit_tensor(run / "run" / "model" / "head.safetensors", "weight", lambda t: t.clone().fill_(float("nan")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedArtifactWarning)
        _one_line_error(_score(run, "map"), run / "run" / "model" / "head.safetensors", "NaN")


def test_lora_rank_mismatch_in_config(run: Path) -> None:
    _edit_json(run / "run" / "model" / "bayesrm.json", lambda d: d.update(lora_r=4))
    _one_line_error(_score(run, "map"), run / "run" / "model" / "adapter_model.safetensors", "lora_r=4")


def test_missing_and_unlisted_tensor_files(run: Path) -> None:
    (run / "run" / "model" / "head.safetensors").unlink()
    _one_line_error(_score(run, "map"), run / "run" / "model" / "head.safetensors", "missing")
    _edit_json(run / "run" / "model" / "bayesrm.json", lambda d: d["checksums"].pop("head.safetensors"))
    _one_line_error(_score(run, "map"), "bayesrm.json", "no checksum recorded for head.safetensors")


def test_old_model_without_checksums_loads_with_a_warning(run: Path) -> None:
    want = RewardModel.load(run / "run").score(["q"], ["good great"])
    _old_format(run)
    with pytest.warns(UnverifiedArtifactWarning, match="bayesrm.json: no checksums"):
        got = RewardModel.load(run / "run").score(["q"], ["good great"])
    assert torch.equal(got, want)


def test_damaged_ensemble_member_and_merge_input(laplace_ensemble: Path, tmp_path: Path) -> None:
    from bayesrm.ensemble import EnsembleRewardModel
    from bayesrm.merge import read_member

    ens = tmp_path / "ens"
    shutil.copytree(laplace_ensemble, ens)
    head = ens / "member_1" / "model" / "head.safetensors"
    _flip_last_byte(head)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        EnsembleRewardModel.load(ens)
    assert str(head) in str(info.value)
    with pytest.raises(DataError, match="checksum mismatch"):
        read_member(ens / "member_1")


def test_damaged_training_checkpoint(tmp_path: Path, tiny_dir: dict[str, str]) -> None:
    data = _pairs_file(tmp_path / "pairs.jsonl")
    args = ["train", data, "--out", tmp_path / "r", "--backbone", tiny_dir["bert"], "--max-length", "32",
            "--lora-r", "2", "--batch-size", "4", "--max-steps", "2", "--checkpoint-every", "1", "--eval-frac", "0.2"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    ck = tmp_path / "r" / "checkpoint" / "trainable.safetensors"
    _flip_last_byte(ck)
    _one_line_error([*args, "--resume"], ck, "checksum mismatch")


# --------------------------------------------------------------------------- output paths


def test_out_is_a_directory_or_under_a_file(run: Path) -> None:
    (run / "adir").mkdir()
    base = ["score", run / "run", run / "in.jsonl", "--spec", "map", "--out"]
    _one_line_error([*base, run / "adir"], run / "adir", "is a directory")
    _one_line_error([*base, run / "in.jsonl" / "out.jsonl"], run / "in.jsonl" / "out.jsonl", "is a file")
    _one_line_error([*base, run / "in.jsonl" / "x" / "out.jsonl"], "in.jsonl is a file")


def test_out_not_writable_names_the_users_path(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out.json"
    elif os.path.isdir("/sys"):
        target = Path("/sys/bayesrm-out.json")  # sysfs refuses new files even to root
    else:  # pragma: no cover
        pytest.skip("no unwritable directory available")
    with pytest.raises(DataError) as info:
        atomic_write_json(target, {"a": 1})
    assert str(info.value).startswith(f"{target}: cannot write") and ".tmp" not in str(info.value)


def test_atomic_writes_keep_the_mode_or_use_the_umask(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text("{}")
    f.chmod(0o640)
    atomic_write_json(f, {"a": 1})
    assert stat.S_IMODE(f.stat().st_mode) == 0o640 and json.loads(f.read_text()) == {"a": 1}
    umask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "hi")
        with atomic_dir(tmp_path / "newdir") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(umask)
    import bayesrm.io as bio

    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o666 & ~bio._UMASK
    assert stat.S_IMODE((tmp_path / "newdir").stat().st_mode) == 0o777 & ~bio._UMASK


def test_no_nan_or_inf_in_any_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"r\.json: curves\.la\[1\] is NaN or infinite") as info:
        atomic_write_json(tmp_path / "r.json", {"curves": {"la": [0.5, float("nan")]}})
    assert not (tmp_path / "r.json").exists() and ".tmp" not in str(info.value)
    with pytest.raises(DataError, match=r"s\.jsonl:2: reward_std is NaN"):
        write_jsonl(tmp_path / "s.jsonl", [{"reward_std": 1.0}, {"reward_std": float("inf")}])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- input files


def _train(path: Path, tmp: Path) -> list[object]:
    return ["train", path, "--out", tmp / "r"]


def test_truncated_jsonl_gz(tmp_path: Path) -> None:
    raw = "".join(json.dumps(p.to_dict()) + "\n" for p in toy_pairs(400)).encode()
    f = tmp_path / "pairs.jsonl.gz"
    f.write_bytes(gzip.compress(raw)[:2000])
    line = _one_line_error(_train(f, tmp_path), f, "truncated")
    assert f"{f}:" in line  # and the line it stopped at


def test_corrupt_gzip(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl.gz"
    f.write_bytes(b"not gzip at all\n")
    _one_line_error(_train(f, tmp_path), f, "gzip")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"pairs{suffix}"
    good = PAIRS[0].to_dict()
    if suffix == ".jsonl":
        text = (json.dumps(good) + "\n").encode() * 2 + b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n'
    elif suffix == ".csv":
        text = b"prompt,chosen,rejected\np,a,b\np,a,b\np\xfe,a,b\n"
    else:
        text = b'[\n{"prompt": "p", "chosen": "a", "rejected": "b"},\n\n{"prompt": "p\xc3", "chosen": "a", ' \
               b'"rejected": "b"}\n]\n'
    f.write_bytes(text)
    _one_line_error(_train(f, tmp_path), f"{f}:{4 if suffix != '.jsonl' else 3}:", "invalid UTF-8")


def test_null_field_is_not_missing(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(PAIRS[0].to_dict()) + "\n" + json.dumps({"prompt": "p", "chosen": None,
                                                                        "rejected": "b"}) + "\n")
    line = _one_line_error(_train(f, tmp_path), f"{f}:2:", "field 'chosen'", "is null")
    assert "missing" not in line.split(f"{f}:2:")[1]


def test_directory_and_fifo_inputs(tmp_path: Path) -> None:
    d = tmp_path / "adir.jsonl"
    d.mkdir()
    _one_line_error(_train(d, tmp_path), d, "is a directory")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    _one_line_error(_train(fifo, tmp_path), fifo, "not a regular file")
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_score_input_null_and_missing_fields(run: Path) -> None:
    f = run / "rows.jsonl"
    f.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p", "response": None})
                 + "\n" + json.dumps({"prompt": "p"}) + "\n")
    args = ["score", run / "run", f, "--out", run / "o.jsonl", "--spec", "map"]
    _one_line_error(args, f"{f}:2:", "field 'response'", "is null")
    f.write_text(json.dumps({"prompt": "p"}) + "\n")
    _one_line_error(args, f"{f}:1:", "field 'response'", "missing")
