"""Artifact integrity: sha256 of every tensor file recorded in the metadata beside it, verified on load.

A saved model (`bayesrm.json`), Laplace posterior (`posterior.json`) or training checkpoint (`state.json`) lists
`{"checksums": {file name: sha256}}` for the `.safetensors` files of its directory. Loading verifies them, so a
flipped byte is an error naming the file instead of a plausible reward or σ. Artifacts written before checksums
were recorded still load, with an `UnverifiedArtifactWarning`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from bayesrm.data import DataError

CHECKSUMS_KEY = "checksums"


class UnverifiedArtifactWarning(UserWarning):
    """An artifact without recorded checksums (written by an older bayesrm) was loaded unverified."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tensor_checksums(directory: str | Path) -> dict[str, str]:
    """{name: sha256} of every `.safetensors` file directly inside `directory`, by name."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).glob("*.safetensors"))}


def verify_checksums(directory: str | Path, meta: Mapping[str, Any], meta_file: str | Path,
                     required: Iterable[str] = ()) -> None:
    """Check the files listed in `meta["checksums"]` (and that every `required` name is listed); DataError if not.

    Metadata without checksums (an older artifact) only warns, since nothing can be verified.
    """
    d, recorded = Path(directory), meta.get(CHECKSUMS_KEY)
    if recorded is None:
        warnings.warn(f"{meta_file}: no checksums recorded (written by an older bayesrm); its tensor files are "
                      "loaded unverified", UnverifiedArtifactWarning, stacklevel=3)
        return
    if not isinstance(recorded, dict):
        raise DataError(f"'{CHECKSUMS_KEY}' must map file names to sha256 digests", file=str(meta_file))
    for name in required:
        if name not in recorded:
            raise DataError(f"no checksum recorded for {name}", file=str(meta_file))
    for name, digest in recorded.items():
        f = d / name
        if not f.is_file():
            raise DataError(f"missing (listed in {Path(meta_file).name})", file=str(f))
        if file_sha256(f) != digest:
            raise DataError(f"checksum mismatch: damaged or changed after {Path(meta_file).name} was written",
                            file=str(f))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with every failure (missing, truncated, garbled) as one DataError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise DataError("missing" if not p.exists() else "not a regular file", file=str(p))
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DataError(f"not a readable safetensors file ({e})", file=str(p)) from None


def require_finite(tensors: Mapping[str, torch.Tensor], file: str | Path) -> None:
    """DataError naming the first tensor with a NaN or ±inf entry."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not all(bool(torch.isfinite(x)) for x in torch.aminmax(t)):
            raise DataError(f"tensor '{name}' has NaN or infinite entries", file=str(file))  # NaN propagates


def require_positive(value: Any, what: str, file: str | Path, *, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (≥ 0 with `allow_zero`); DataError naming `what` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise DataError(f"{what} must be a finite number {bound}, got {value!r}", file=str(file))
    return float(value)


def one_line(e: BaseException) -> str:
    """An exception message on one line (torch's size-mismatch reports span several)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
