"""Preference data: one pair schema, loaders for common formats, validation and prompt-disjoint splits."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data, with the file, line (1-based) and field where it was found."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ":".join(str(x) for x in (file, line) if x is not None)
        loc = f"{where}: " if where else ""
        fld = f"field '{field}': " if field else ""
        super().__init__(f"{loc}{fld}{message}")
        self.file, self.line, self.field = file, line, field


@dataclass(frozen=True)
class Pair:
    """A preference: `chosen` was preferred to `rejected` as a response to `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    id: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.id is not None:
            d["id"] = self.id
        if self.source is not None:
            d["source"] = self.source
        if self.meta:
            d["meta"] = self.meta
        return d


@dataclass
class LoadReport:
    """What a loader kept and dropped (skipped invalid rows, AlpacaEval ties)."""

    kept: int = 0
    skipped: int = 0
    ties: int = 0
    errors: list[str] = field(default_factory=list)  # first few skipped-row messages


class DataFormat(str, Enum):
    """Input layouts `load_pairs` understands."""

    AUTO = "auto"
    PAIRS = "pairs"  # generic rows with prompt/chosen/rejected columns (field mapping allowed)
    HH = "hh"  # Anthropic hh-rlhf: full transcripts in chosen/rejected
    ALPACA_EVAL = "alpaca_eval"  # AlpacaEval judge annotations (instruction, output_1/2, preference)


# --------------------------------------------------------------------------- raw rows


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_or_row_number, row dict) from jsonl / json / csv / parquet (optionally .gz)."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(p))
    kind = _suffix(p)
    if kind in (".jsonl", ".ndjson"):
        with _open_text(p) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON ({e.msg}, column {e.colno})", file=str(p), line=i) from None
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}", file=str(p), line=i)
                yield i, row
    elif kind == ".json":
        with _open_text(p) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg})", file=str(p), line=e.lineno) from None
        if isinstance(data, dict):  # {"data": [...]} or column-oriented
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                data = lists[0]
            else:
                raise DataError("expected a list of objects (or one key holding it)", file=str(p))
        if not isinstance(data, list):
            raise DataError("expected a list of objects", file=str(p))
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DataError(f"item {i} is not an object", file=str(p), line=i)
            yield i, row
    elif kind in (".csv", ".tsv"):
        with _open_text(p) as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, dict(row)
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - optional dependency
            raise DataError("reading parquet needs pyarrow: pip install 'bayesrm[parquet]'", file=str(p)) from None
        table = pq.read_table(p)
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row
    else:
        raise DataError(f"unknown file type '{kind or p.name}' (use .jsonl, .json, .csv, .tsv, .parquet)",
                        file=str(p))


def _iter_hf(spec: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Hugging Face dataset: 'hf:NAME[:SPLIT]' (needs the `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError("'hf:' inputs need the `datasets` package (pip install datasets)", file=spec) from None
    parts = spec[3:].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


# --------------------------------------------------------------------------- converters

HH_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split hh-rlhf transcripts at the last '\\n\\nAssistant:' into (prompt, chosen reply, rejected reply).

    The prompt is the chosen transcript's dialogue up to and including the final 'Assistant:' tag
    (Bai et al. 2022); in a few pairs the two prefixes differ and the chosen one is kept.
    """
    ic, ir = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if ic < 0 or ir < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut = len(HH_ASSISTANT)
    prompt = chosen[: ic + cut]
    return prompt.strip(), chosen[ic + cut:].strip(), rejected[ir + cut:].strip()


def _text(row: Mapping[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise KeyError(key)
    v = row[key]
    if not isinstance(v, str):
        raise TypeError(key, type(v).__name__)
    return v


def _row_to_pair(row: Mapping[str, Any], fmt: DataFormat, fields: Mapping[str, str],
                 report: LoadReport) -> Pair | None:
    """Convert one raw row; raises KeyError/TypeError/ValueError(field, msg) on bad rows, None for ties."""
    if fmt is DataFormat.HH:
        prompt, chosen, rejected = split_hh(_text(row, "chosen"), _text(row, "rejected"))
        return Pair(prompt, chosen, rejected, source="hh-rlhf")
    if fmt is DataFormat.ALPACA_EVAL:
        pref = row.get("preference")
        if pref is None or pref == "":
            raise ValueError("preference", "missing judge preference")
        try:
            v = float(pref)
        except (TypeError, ValueError):
            raise ValueError("preference", f"not a number: {pref!r}") from None
        if not 1.0 <= v <= 2.0:
            raise ValueError("preference", f"{v} outside [1, 2]")
        if v == 1.5:
            report.ties += 1
            return None
        o1, o2 = _text(row, "output_1"), _text(row, "output_2")
        chosen, rejected = (o2, o1) if v > 1.5 else (o1, o2)
        meta = {"preference": v, "generator_1": row.get("generator_1"), "generator_2": row.get("generator_2"),
                "annotator": row.get("annotator")}
        return Pair(_text(row, "instruction"), chosen, rejected, source=row.get("dataset"), meta=meta)
    prompt = _text(row, fields.get("prompt", "prompt"))
    chosen = _text(row, fields.get("chosen", "chosen"))
    rejected = _text(row, fields.get("rejected", "rejected"))
    rid = row.get(fields.get("id", "id"))
    src = row.get(fields.get("source", "source"))
    raw_meta = row.get("meta")
    return Pair(prompt, chosen, rejected, id=None if rid is None else str(rid),
                source=None if src is None else str(src), meta=raw_meta if isinstance(raw_meta, dict) else {})


def _detect(row: Mapping[str, Any], fields: Mapping[str, str]) -> DataFormat:
    keys = set(row)
    if {"instruction", "output_1", "output_2", "preference"} <= keys:
        return DataFormat.ALPACA_EVAL
    if {"chosen", "rejected"} <= keys and fields.get("prompt", "prompt") not in keys:
        return DataFormat.HH
    return DataFormat.PAIRS


def validate_pair(pair: Pair) -> None:
    """Raise ValueError(field, message) if a pair cannot be trained on."""
    for name in ("prompt", "chosen", "rejected"):
        if name != "prompt" and not getattr(pair, name).strip():
            raise ValueError(name, "empty response")
    if pair.chosen == pair.rejected:
        raise ValueError("rejected", "identical to chosen")


def load_pairs(
    path: str | Path,
    *,
    format: DataFormat | str = DataFormat.AUTO,
    fields: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    annotator: str | None = "weighted_alpaca_eval_gpt4_turbo",
    report: LoadReport | None = None,
) -> list[Pair]:
    """Load preference pairs from a file or 'hf:NAME[:SPLIT]' into the one `Pair` schema.

    `fields` maps schema names (prompt, chosen, rejected, id, source) to column names. Invalid rows raise
    `DataError` naming file, line and field, or are counted in `report.skipped` with `skip_invalid`.
    `annotator` filters AlpacaEval annotations to one judge (None keeps all).
    """
    fmt = DataFormat(format)
    fields = dict(fields or {})
    report = report if report is not None else LoadReport()
    name = str(path)
    rows: Iterable[tuple[int, dict[str, Any]]] = _iter_hf(name) if name.startswith("hf:") else iter_rows(path)
    out: list[Pair] = []
    for line, row in rows:
        if fmt is DataFormat.AUTO:
            fmt = _detect(row, fields)
        if fmt is DataFormat.ALPACA_EVAL and annotator is not None and row.get("annotator") not in (None, annotator):
            continue
        try:
            pair = _row_to_pair(row, fmt, fields, report)
            if pair is None:
                continue
            validate_pair(pair)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, KeyError):
                msg, fld = "missing", str(e.args[0])
            elif isinstance(e, TypeError) and len(e.args) == 2:
                fld, msg = str(e.args[0]), f"expected text, got {e.args[1]}"
            elif len(e.args) == 2:
                fld, msg = str(e.args[0]), str(e.args[1])
            else:
                fld, msg = "", str(e)
            err = DataError(msg, file=name, line=line, field=fld or None)
            if not skip_invalid:
                raise err from None
            report.skipped += 1
            if len(report.errors) < 5:
                report.errors.append(str(err))
            continue
        if pair.id is None:
            pair = Pair(pair.prompt, pair.chosen, pair.rejected, id=f"{Path(name).name}:{line}",
                        source=pair.source, meta=pair.meta)
        out.append(pair)
        if limit is not None and len(out) >= limit:
            break
    report.kept = len(out)
    return out


def save_pairs(pairs: Iterable[Pair], path: str | Path) -> None:
    """Write pairs as jsonl (atomically)."""
    from bayesrm.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs))


# --------------------------------------------------------------------------- splits


def _prompt_key(prompt: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{prompt}".encode()).hexdigest()


def split_prompts(prompts: Iterable[str], fractions: Sequence[float], seed: int = 0) -> list[set[str]]:
    """Partition unique prompts into len(fractions) disjoint sets, deterministically for a seed."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    uniq = sorted(set(prompts), key=lambda p: _prompt_key(p, seed))
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * len(uniq)))
    out, start = [], 0
    for b in bounds:
        out.append(set(uniq[start:b]))
        start = b
    return out


def split_by_prompt(pairs: Sequence[Pair], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> list[list[Pair]]:
    """Seeded split in which no prompt appears in two parts (the order of pairs is kept)."""
    groups = split_prompts((p.prompt for p in pairs), fractions, seed)
    return [[p for p in pairs if p.prompt in g] for g in groups]


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    """A seeded permutation (used for data order)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
