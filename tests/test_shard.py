"""Sharded scoring: shard ranges, atomic shard files, manifest checks, in-order merge, and `bayesrm score` with 2 real
worker processes, resumed shards and launcher (accelerate/torchrun) ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bayesrm import shard as sh
from bayesrm.cli import app

runner = CliRunner()


def _run(n: int = 10, shards: int = 2) -> sh.ShardRun:
    return sh.ShardRun("/in.jsonl", 100, 1, n, "/model", "map", ("prompt", "response"), shards)


@pytest.mark.parametrize("rows", [0, 1, 5, 10, 11])
def test_shard_ranges_cover_rows_once_in_order(rows: int) -> None:
    for n in (1, 2, 3, 7):
        spans = [sh.shard_range(rows, i, n) for i in range(n)]
        assert [i for s in spans for i in s] == list(range(rows))
        assert max(map(len, spans)) - min(map(len, spans)) <= 1


def test_parse_shard_and_paths(tmp_path: Path) -> None:
    assert sh.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="I/N"):
            sh.parse_shard(bad)
    assert sh.shard_path(tmp_path / "s.jsonl", 1, 2) == tmp_path / "s.jsonl.shards" / "shard-00001-of-00002.jsonl"
    with pytest.raises(ValueError):
        sh.shard_range(5, 2, 2)


def test_merge_in_order_and_refuse_missing_or_short(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    sh.write_shard(out, 1, 3, [{"i": 2}])
    with pytest.raises(FileNotFoundError, match=r"shards \[0, 2\] of 3"):
        sh.merge_shards(out, 3)
    sh.write_shard(out, 0, 3, [{"i": 0}, {"i": 1}])
    sh.write_shard(out, 2, 3, [])
    assert sh.pending_shards(out, 3) == []
    with pytest.raises(ValueError, match="3 rows, the input has 4"):
        sh.merge_shards(out, 3, expected_rows=4)
    assert not out.exists()  # a failed merge leaves nothing behind
    assert sh.merge_shards(out, 3, expected_rows=3) == 3
    assert [json.loads(x)["i"] for x in out.read_text().splitlines()] == [0, 1, 2]
    assert not list(sh.shard_dir(out).glob(".*.tmp"))


def test_prepare_shards_reuses_same_run_and_guards_others(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert sh.prepare_shards(out, _run()) is False
    sh.write_shard(out, 0, 2, [{"i": 0}])
    assert sh.prepare_shards(out, _run()) is False and sh.pending_shards(out, 2) == [1]  # same run: shard 0 kept
    with pytest.raises(ValueError, match="different run"):
        sh.prepare_shards(out, _run(n=11))
    assert sh.prepare_shards(out, _run(n=11), discard=True) is True
    assert sh.pending_shards(out, 2) == [0, 1]


def test_launcher_rank_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sh.launcher_rank() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert sh.launcher_rank() == (1, 2, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sh.launcher_rank() is None
    assert sh.threads_per_process(2, cores=2) == 1 and sh.threads_per_process(3, cores=2) == 1
    assert sh.threads_per_process(2, cores=16) == 8


# --------------------------------------------------------------------------- `bayesrm score` end to end


@pytest.fixture(scope="module")
def scoring_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["good", "bad", "great", "awful", "helpful", "rude", "clear", "vague", "kind", "harsh"]
    path = tmp_path_factory.mktemp("shard") / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"question {i % 3}", "response": " ".join(words[i:i + 3])})
                            + "\n" for i in range(9)))
    return path


@pytest.fixture(scope="module")
def single(laplace_ensemble: Path, scoring_input: Path) -> list[dict]:
    out = scoring_input.with_name("single.jsonl")
    res = runner.invoke(app, ["score", str(laplace_ensemble / "member_0"), str(scoring_input), "--out", str(out),
                              "--spec", "la:var:k=1"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in out.read_text().splitlines()]


def _same(rows: list[dict], ref: list[dict]) -> None:
    assert [r["id"] for r in rows] == [r["id"] for r in ref] == list(range(9))
    for a, b in zip(rows, ref, strict=True):
        assert a["penalty"] == b["penalty"] == "la:var:k=1"
        for key in ("reward", "reward_std", "reward_penalized"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)


def test_score_two_worker_processes_merge_in_input_order(laplace_ensemble: Path, scoring_input: Path,
                                                         single: list[dict], tmp_path: Path) -> None:
    out = tmp_path / "par.jsonl"
    res = runner.invoke(app, ["score", str(laplace_ensemble / "member_0"), str(scoring_input), "--out", str(out),
                              "--spec", "la:var:k=1", "--num-processes", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps long lines
    assert "wrote 9 scored rows" in said and "(2 shards)" in said
    _same([json.loads(x) for x in out.read_text().splitlines()], single)
    assert not sh.shard_dir(out).exists()  # shards are removed once merged


def test_score_rerun_skips_finished_shards(laplace_ensemble: Path, scoring_input: Path, single: list[dict],
                                           tmp_path: Path) -> None:
    model, out = str(laplace_ensemble / "member_0"), tmp_path / "res.jsonl"
    base = ["score", model, str(scoring_input), "--out", str(out), "--spec", "la:var:k=1"]
    for i in range(2):  # e.g. a job array; here in-process
        res = runner.invoke(app, [*base, "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    first = sh.shard_path(out, 0, 2)
    rows = [json.loads(x) for x in first.read_text().splitlines()]
    first.write_text("".join(json.dumps(r | {"marker": True}) + "\n" for r in rows))  # to see it is reused
    res = runner.invoke(app, [*base, "--num-processes", "2"])  # all shards done: no worker starts, only the merge
    assert res.exit_code == 0, res.output
    assert "2 of 2 shards already done" in " ".join(res.output.split())
    merged = [json.loads(x) for x in out.read_text().splitlines()]
    _same(merged, single)
    assert [r.get("marker", False) for r in merged] == [True] * len(rows) + [False] * (9 - len(rows))


def test_score_under_launcher_ranks(laplace_ensemble: Path, scoring_input: Path, single: list[dict],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ranked.jsonl"
    args = ["score", str(laplace_ensemble / "member_0"), str(scoring_input), "--out", str(out), "--spec",
            "la:var:k=1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 finishes last: it waits for every shard, then merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    _same([json.loads(x) for x in out.read_text().splitlines()], single)


def test_score_shard_refuses_other_runs_shards(laplace_ensemble: Path, scoring_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    args = ["score", str(laplace_ensemble / "member_0"), str(scoring_input), "--out", str(out), "--shard", "0/2"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, [*args[:-1], "1/3"])
    assert res.exit_code == 2 and "different run" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [*args, "--num-processes", "2"])
    assert res.exit_code == 2 and "cannot be combined" in res.output
