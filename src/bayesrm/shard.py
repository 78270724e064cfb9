"""Sharded scoring: split N input rows into contiguous shards, one file per shard, merge them back in input order.

`bayesrm score --num-processes N` (or one process per rank under `accelerate launch` / `torchrun`) scores shard i
into ``<out>.shards/shard-0000i-of-0000N.jsonl``. A shard file is written atomically (temp file + rename), so a
shard is finished exactly when its file exists: a rerun after a crash skips finished shards. A manifest records
what the shards were computed from (input, model, spec, fields, shard count); shards from another run are discarded.
The scoring of a shard, of N local processes (`score_parallel`) and of launcher ranks (`score_ranked`) lives here;
`bayesrm score` only parses arguments and picks one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bayesrm.data import DataError, iter_rows
from bayesrm.io import atomic_path, atomic_write_json, json_text

MANIFEST = "manifest.json"


def shard_range(num_rows: int, index: int, num_shards: int) -> range:
    """Rows [start, stop) of shard `index` (0-based) of `num_shards`: contiguous, sizes differ by at most one."""
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard {index} of {num_shards}: need 0 ≤ index < num_shards")
    base, extra = divmod(num_rows, num_shards)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0-based I) → (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects I/N with 0 ≤ I < N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard expects I/N with 0 ≤ I < N (e.g. 0/4), got {text!r}")
    return i, n


def shard_dir(out: str | Path) -> Path:
    """Folder of the per-shard outputs of `out`: ``<out>.shards``."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(out: str | Path, index: int, num_shards: int) -> Path:
    """File of shard `index` of `num_shards`: ``<out>.shards/shard-00000-of-00004.jsonl``."""
    return shard_dir(out) / f"shard-{index:05d}-of-{num_shards:05d}.jsonl"


def pending_shards(out: str | Path, num_shards: int) -> list[int]:
    """Indices of the shards whose file does not exist yet (a file exists only once fully written)."""
    return [i for i in range(num_shards) if not shard_path(out, i, num_shards).exists()]


def write_shard(out: str | Path, index: int, num_shards: int, rows: list[dict[str, Any]]) -> Path:
    """Write one shard's scored rows as JSON lines, atomically."""
    path = shard_path(out, index, num_shards)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for i, r in enumerate(rows, 1):
            f.write(json_text(r, path, line=i) + "\n")
    return path


def merge_shards(out: str | Path, num_shards: int, expected_rows: int | None = None) -> int:
    """Concatenate all shard files in shard order into `out` (atomically); return the number of rows.

    Raises `FileNotFoundError` naming the missing shards and `ValueError` if the row count is not `expected_rows`.
    """
    missing = pending_shards(out, num_shards)
    if missing:
        raise FileNotFoundError(f"{shard_dir(out)}: shards {missing} of {num_shards} are not finished")
    rows = 0
    with atomic_path(out) as tmp, tmp.open("wb") as dst:
        for i in range(num_shards):
            with shard_path(out, i, num_shards).open("rb") as src:
                for line in src:
                    dst.write(line if line.endswith(b"\n") else line + b"\n")
                    rows += 1
        if expected_rows is not None and rows != expected_rows:
            raise ValueError(f"{shard_dir(out)}: shards hold {rows} rows, the input has {expected_rows}")
    return rows


@dataclass(frozen=True)
class ShardRun:
    """What a set of shards was computed from; shards are reused only for an identical run."""

    input: str  # absolute input path
    input_size: int  # bytes
    input_mtime_ns: int
    num_rows: int
    model: str  # absolute model path
    spec: str  # canonical selection spec
    fields: tuple[str, str]  # (prompt field, response field)
    num_shards: int

    @classmethod
    def describe(cls, input: str | Path, num_rows: int, model: str | Path, spec: str, fields: tuple[str, str],
                 num_shards: int) -> ShardRun:
        st = os.stat(input)
        return cls(str(Path(input).resolve()), st.st_size, st.st_mtime_ns, num_rows, str(Path(model).resolve()),
                   spec, fields, num_shards)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _read_manifest(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_shards(out: str | Path, run: ShardRun, discard: bool = False) -> bool:
    """Make ``<out>.shards`` a folder for the shards of `run` and write its manifest.

    Shards of a different run (other manifest, or shard files without one) are deleted if `discard` (return True),
    else `ValueError`. Safe to call from several workers of one run at once when `discard` is False.
    """
    folder, want = shard_dir(out), run.to_dict()
    manifest = folder / MANIFEST
    found = _read_manifest(manifest)
    if found == want:
        return False
    stale = found is not None or (folder.exists() and any(folder.glob("shard-*.jsonl")))
    if stale and not discard:
        raise ValueError(f"{folder} holds shards of a different run (input, model, spec, fields or shard count "
                         "changed); delete it or choose another --out")
    if stale:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, want)
    return stale


def wait_for_shards(out: str | Path, num_shards: int, poll_s: float = 0.5, timeout_s: float | None = None) -> None:
    """Block until every shard file exists (other processes write them); `TimeoutError` after `timeout_s`."""
    start = time.monotonic()
    while pending := pending_shards(out, num_shards):
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{shard_dir(out)}: shards {pending} of {num_shards} not finished after {timeout_s} s")
        time.sleep(poll_s)


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by a distributed launcher (accelerate, torchrun), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def threads_per_process(num_processes: int, cores: int | None = None) -> int:
    """Torch threads for each of `num_processes` workers so that together they use the available cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(num_processes, 1))


# --------------------------------------------------------------------------- scoring rows


def score_rows(input: str, prompt_field: str, response_field: str) -> Iterator[dict[str, Any]]:
    """Rows of a `score` input, each checked to hold text in the prompt and response fields."""
    for line, row in iter_rows(input):
        for f in (prompt_field, response_field):
            v = row.get(f)
            if not isinstance(v, str):
                what = "missing" if f not in row else "is null" if v is None else f"not text ({type(v).__name__})"
                raise DataError(what, file=input, line=line, field=f)
        yield row


def add_scores(scorer: Any, rows: list[dict[str, Any]], fields: tuple[str, str],
                progress: Callable[[int], None] | None = None) -> None:
    """Add `reward` to each row and, for uncertainty specs, reward_std, reward_var, reward_penalized and penalty."""
    if not rows:
        return
    scores = scorer.score([r[fields[0]] for r in rows], [r[fields[1]] for r in rows], progress=progress)
    for r, s in zip(rows, scores.rows(), strict=True):
        r["reward"] = s["reward"]
        if scorer.spec.family.value != "map":
            std = s["std"]
            if std is not None:
                r |= {"reward_std": std, "reward_var": std**2}
            r |= {"reward_penalized": s["selection"], "penalty": str(scorer.spec)}


def score_device(device: str, index: int) -> str | None:
    """`--device auto`: GPU index mod #GPUs when CUDA is available, else None (CPU); anything else as given."""
    import torch

    if device != "auto":
        return device
    return f"cuda:{index % torch.cuda.device_count()}" if torch.cuda.is_available() else None


def score_shard(model_dir: Path, input: str, out: Path, spec: str, fields: tuple[str, str], index: int, num: int,
                batch_size: int, device: str | None, log: Callable[[str], None] = print) -> None:
    """Score rows of shard `index` of `num` into its shard file (skipped if that file exists)."""
    import itertools
    import time

    from bayesrm.scoring import Scorer

    total = sum(1 for _ in score_rows(input, *fields))
    prepare_shards(out, ShardRun.describe(input, total, model_dir, spec, fields, num))
    if shard_path(out, index, num).exists():
        log(f"shard {index}/{num} already done")
        return
    span, t0 = shard_range(total, index, num), time.perf_counter()
    rows = list(itertools.islice(score_rows(input, *fields), span.start, span.stop))
    add_scores(Scorer.load(model_dir, spec, device=device, batch_size=batch_size), rows, fields)
    write_shard(out, index, num, rows)
    log(f"shard {index}/{num}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s")


def score_parallel(model_dir: Path, input: str, out: Path, spec: str, fields: tuple[str, str], num: int,
                   batch_size: int, threads: int | None, device: str, log: Callable[[str], None] = print) -> None:
    """Score `num` shards in `num` processes, then merge in input order.

    This process scores the first unfinished shard itself and starts `bayesrm score --shard i/num` for the others.
    """
    import subprocess
    import sys

    import torch


    total = sum(1 for _ in score_rows(input, *fields))  # every row is checked before any worker starts
    if prepare_shards(out, ShardRun.describe(input, total, model_dir, spec, fields, num), discard=True):
        log(f"discarded shards of a different earlier run in {shard_dir(out)}")
    todo = pending_shards(out, num)
    if len(todo) < num:
        log(f"{num - len(todo)} of {num} shards already done")
    t = threads or threads_per_process(max(len(todo), 1))
    env = os.environ | {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), "RAYON_NUM_THREADS": str(t)}
    base = [sys.executable, "-m", "bayesrm", "score", str(model_dir), input, "--out", str(out), "--spec", spec,
            "--batch-size", str(batch_size), "--prompt-field", fields[0], "--response-field", fields[1],
            "--threads", str(t)]
    procs = {i: subprocess.Popen([*base, "--shard", f"{i}/{num}", "--device", score_device(device, i) or "cpu"],
                                 env=env) for i in todo[1:]}
    try:
        if todo:
            torch.set_num_threads(t)
            score_shard(model_dir, input, out, spec, fields, todo[0], num, batch_size, score_device(device, todo[0]),
                        log)
        codes = {i: p.wait() for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = {i: c for i, c in codes.items() if c != 0}
    if failed:
        raise ValueError(f"shards {sorted(failed)} of {num} failed (exit codes {sorted(set(failed.values()))}); "
                         "rerun the same command to redo only unfinished shards")
    rows = merge_shards(out, num, total)
    shutil.rmtree(shard_dir(out))
    log(f"wrote {rows} scored rows to {out} ({num} shards)")




def score_ranked(model_dir: Path, input: str, out: Path, spec: str, fields: tuple[str, str], rank: int, world: int,
                 local: int, batch_size: int, device: str, log: Callable[[str], None] = print) -> None:
    """Under `accelerate launch` / `torchrun`: each rank scores its shard; rank 0 waits for all and merges."""
    score_shard(model_dir, input, out, spec, fields, rank, world, batch_size, score_device(device, local), log)
    if rank == 0:
        wait_for_shards(out, world)
        merged = merge_shards(out, world)
        shutil.rmtree(shard_dir(out))
        log(f"wrote {merged} scored rows to {out} ({world} ranks)")
