"""Atomic file output: results, checkpoints and caches are never left half-written.

A replaced file keeps its permissions (a new one gets the umask default, not mkstemp's 0600), and every failure
is one `DataError` naming the user's path, never the temporary file. JSON never holds NaN or ±inf: writing one is
an error naming the file and the field, so an uncomputed number is never reported as a result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bayesrm.data import DataError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def _write_error(dest: Path, e: OSError) -> DataError:
    """One line for an OSError met while writing `dest` (the temporary file's name is never shown)."""
    return DataError(f"cannot write ({e.strerror or type(e).__name__})", file=str(dest))


def check_target(dest: Path, want_dir: bool = False) -> None:
    """DataError if `dest` cannot become a file (or directory): wrong kind, or a parent that is a file."""
    if dest.exists() and dest.is_dir() != want_dir:
        kind, want = ("a directory", "file") if dest.is_dir() else ("not a directory", "directory")
        raise DataError(f"cannot write: it is {kind}; give a {want} path", file=str(dest))
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"cannot write: {parent} is a file, not a directory", file=str(dest))
            break


def _mode(dest: Path, default: int) -> int:
    """Permission bits for `dest`: those of the file it replaces, else `default` less the umask."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return default & ~_UMASK


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    dest = Path(path)
    check_target(dest, want_dir=False)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise _write_error(dest, e) from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, _mode(dest, 0o666))
            os.replace(tmp, dest)
        except OSError as e:
            if e.filename not in (tmp, str(dest)):
                raise
            raise _write_error(dest, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _nonfinite_at(obj: Any, where: str = "") -> str | None:
    """Key path ('a.b[2]') of the first NaN or ±inf float inside `obj`, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "value")
    if isinstance(obj, dict):
        items: Iterable[tuple[str, Any]] = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for w, v in items:
        found = _nonfinite_at(v, w)
        if found is not None:
            return found
    return None


def nan_to_null(obj: Any) -> Any:
    """`obj` with every NaN float replaced by None, for writers whose NaN means "not available" (e.g. σ of a MAP run).

    Only for values that are absent by design; a NaN from a failed computation must stay an error.
    """
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def json_text(obj: Any, file: str | Path, line: int | None = None, indent: int | None = None) -> str:
    """`json.dumps` (UTF-8) that refuses NaN/±inf with a DataError naming the file, line and field."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError:
        where = _nonfinite_at(obj)
        raise DataError(f"{where} is NaN or infinite; not written (a number that was not computed)",
                        file=str(file), line=line) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indented, UTF-8, no NaN/±inf)."""
    atomic_write_text(path, json_text(obj, path, indent=2) + "\n")


def jsonl_text(path: str | Path, rows: Iterable[Any]) -> str:
    """JSON lines of `rows` (no NaN/±inf; the error names the line)."""
    return "".join(json_text(r, path, line=i) + "\n" for i, r in enumerate(rows, 1))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines atomically."""
    atomic_write_text(path, jsonl_text(path, rows))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces the directory `path` (old one removed)."""
    dest = Path(path)
    check_target(dest, want_dir=True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise _write_error(dest, e) from None
    try:
        yield tmp
        os.chmod(tmp, _mode(dest, 0o777))
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
