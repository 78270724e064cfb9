"""The README Quickstart runs as written: its blocks are read from README.md and executed in a fresh directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- quickstart -->", "<!-- /quickstart -->"


def quickstart_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block between the quickstart markers, in order."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md needs exactly one {BEGIN} … {END} region")
    region = readme[readme.index(BEGIN) + len(BEGIN): readme.index(END)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", region, re.S)]


def test_quickstart_blocks_are_found() -> None:
    blocks = quickstart_blocks((ROOT / "README.md").read_text())
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    bash = blocks[0][1]
    for cmd in ("train", "laplace", "eval", "score", "bon", "explain", "merge", "serve", "rlhf", "heads", "select"):
        assert f"bayesrm {cmd} " in bash
    with pytest.raises(ValueError, match="exactly one"):
        quickstart_blocks("no markers here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    """A fresh directory with only examples/ and constraints.txt; `bayesrm` on the PATH is this checkout's CLI.

    The one change to the text: the server's port 8000 becomes a free port, so a busy 8000 cannot fail the test.
    """
    blocks = quickstart_blocks((ROOT / "README.md").read_text())
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copy(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "bayesrm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bayesrm "$@"\n')  # exec: `kill $!` hits it
    (bindir / "bayesrm").chmod(0o755)
    env = os.environ | {  # `python` and `pip` are this interpreter's (the venv's), `bayesrm` this checkout's
        "PATH": os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = str(_free_port())
    logs = []
    for i, (lang, code) in enumerate(blocks):
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code.replace("8000", port)]
        else:
            cmd = [sys.executable, "-c", code]
        log = tmp_path / f"block_{i}.log"
        with open(log, "w") as out:  # a file, not a pipe: a server left running by a failed block cannot hang us
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=1800)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # anything the block left behind
        logs.append(log.read_text())
        assert rc == 0, f"block {i} ({lang}) failed:\n{logs[-1][-4000:]}"
    bash_log, py_log = logs
    runs = tmp_path / "runs"
    # each step left its own output, none overwritten by a later one
    assert (runs / "rm" / "model" / "laplace" / "posterior.json").exists()
    assert "starting fresh: no checkpoint in runs/rm/checkpoint" in bash_log
    assert (runs / "eval" / "report.json").exists()
    scored = [json.loads(line) for line in (runs / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 16 and all(r["reward_std"] > 0 for r in scored)
    bon = json.loads((runs / "bon" / "results.json").read_text())
    assert [c["name"] for c in bon["curves"]] == ["map", "la:std:k=1", "la:var:k=1"]
    assert bon["config"]["n_boot"] == 100  # the --set override reached the experiment
    assert (runs / "bnrm" / "model").is_dir() and (runs / "merged" / "merge.json").exists()
    assert '"results":[{"reward"' in bash_log  # the curl answer
    rlhf = json.loads((runs / "rlhf" / "results.json").read_text())
    assert set(rlhf["runs"]) == {"map", "la"} and all(len(r["history"]) == 2 for r in rlhf["runs"].values())
    assert len((runs / "selected.jsonl").read_text().splitlines()) == 5
    assert re.search(r"reward -?\d+\.\d+ ± \d+\.\d+", py_log)
    assert (runs / "py" / "model" / "laplace" / "posterior.json").exists()
