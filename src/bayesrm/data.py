"""Preference data: one pair schema, loaders for common formats, validation and prompt-disjoint splits."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import zlib
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

    kept: int = 0  # pairs returned
    skipped: int = 0  # invalid rows skipped (skip_invalid=True)
    ties: int = 0  # AlpacaEval annotations with preference 1.5
    filtered: int = 0  # AlpacaEval annotations by other judges than `annotator`
    errors: list[str] = field(default_factory=list)  # first few skipped-row messages


class DataFormat(str, Enum):
    """Input layouts `load_pairs` understands."""

    AUTO = "auto"
    PAIRS = "pairs"  # generic rows with prompt/chosen/rejected columns (field mapping allowed)
    HH = "hh"  # Anthropic hh-rlhf: full transcripts in chosen/rejected
    ALPACA_EVAL = "alpaca_eval"  # AlpacaEval judge annotations (instruction, output_1/2, preference)


# --------------------------------------------------------------------------- raw rows

RowOrError = tuple[int, dict[str, Any] | DataError]  # a bad record is yielded, not raised, so it can be skipped


def _raw_lines(p: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, gunzipped for .gz; a truncated or corrupt gzip stream is a DataError."""
    i = 0
    with gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb") as f:
        it = iter(f)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise DataError(f"unreadable after line {i}: {_gzip_problem(e)}", file=str(p), line=i + 1) from None
            i += 1
            yield i, raw


def _gzip_problem(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "the gzip stream ends early (truncated file)"
    return f"corrupt gzip data ({e})" if isinstance(e, (gzip.BadGzipFile, zlib.error)) else str(e)


def _decode(raw: bytes, p: Path, line: int) -> str | DataError:
    """UTF-8 text of one line (a leading BOM dropped), or the DataError naming the line and column."""
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", file=str(p), line=line)


def _read_text(p: Path) -> str:
    """A whole text file (gunzipped for .gz); bad UTF-8 or a truncated gzip stream is a DataError naming the line."""
    lines = []
    for i, raw in _raw_lines(p):
        text = _decode(raw, p, i)
        if isinstance(text, DataError):
            raise text
        lines.append(text)
    return "".join(lines)


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _iter_jsonl(p: Path) -> Iterator[RowOrError]:
    for i, raw in _raw_lines(p):
        line = _decode(raw, p, i)
        if isinstance(line, DataError):
            yield i, line
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(f"malformed JSON ({e.msg}, column {e.colno})", file=str(p), line=i)
            continue
        if not isinstance(row, dict):
            yield i, DataError(f"expected a JSON object, got {type(row).__name__}", file=str(p), line=i)
            continue
        yield i, row


def _json_array_items(text: str, file: str) -> Iterator[tuple[int, Any]]:
    """Items of a top-level JSON array with the line each one starts on (raw_decode, one pass)."""
    dec, pos, line, seen = json.JSONDecoder(), text.index("[") + 1, 1, 0

    def skip_ws(k: int) -> int:
        while k < len(text) and text[k] in " \t\r\n":
            k += 1
        return k

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", seen, pos)
        seen = pos
        try:
            item, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg}, column {e.colno})", file=file, line=e.lineno) from None
        yield line, item
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1:].strip():
            return
        line += text.count("\n", seen, pos)
        raise DataError("malformed JSON (expected ',' or ']')", file=file, line=line)


def _iter_json(p: Path) -> Iterator[RowOrError]:
    text = _read_text(p)
    if text.lstrip().startswith("["):
        items: Iterable[tuple[int, Any]] = _json_array_items(text, str(p))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg})", file=str(p), line=e.lineno) from None
        items = enumerate(_unwrap_json(data, str(p)), 1)  # numbered by item: no line positions here
    for i, row in items:
        if not isinstance(row, dict):
            yield i, DataError(f"expected a JSON object, got {type(row).__name__}", file=str(p), line=i)
        else:
            yield i, row


def _unwrap_json(data: Any, file: str) -> list[Any]:
    """Rows of {"data": [...]} (one key holding a list) or column-oriented {"col": [v, ...], ...}."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and len(data) == 1:
            return lists[0]
        if data and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            return [dict(zip(data, vals, strict=True)) for vals in zip(*lists, strict=True)]
    raise DataError("expected a list of objects, one key holding it, or equal-length columns", file=file)


def _iter_csv(p: Path, delimiter: str) -> Iterator[RowOrError]:
    reader = csv.DictReader(io.StringIO(_read_text(p), newline=""), delimiter=delimiter)
    start = 2  # the header is line 1; a quoted field may span several lines
    for row in reader:
        if None in row:
            yield start, DataError(f"{len(row[None])} more values than header columns", file=str(p), line=start)
        else:  # a short row leaves its last columns None: missing (CSV has no null)
            yield start, {k: v for k, v in row.items() if v is not None}
        start = reader.line_num + 1


def _iter_parquet(p: Path) -> Iterator[RowOrError]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - optional dependency
        raise DataError("reading parquet needs pyarrow: pip install 'bayesrm[parquet]'", file=str(p)) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read parquet ({e})", file=str(p)) from None
    yield from enumerate(table.to_pylist(), 1)


def _iter_any(path: str | Path) -> Iterator[RowOrError]:
    """Rows of a file, with bad records as `DataError` values so callers can skip them."""
    p = Path(path)
    if not p.is_file():
        what = "file not found" if not p.exists() else "is a directory" if p.is_dir() else (
            "not a regular file (a FIFO, socket or device); inputs are read more than once, give a file")
        raise DataError(what, file=str(p))
    kind = _suffix(p)
    if kind in (".jsonl", ".ndjson"):
        return _iter_jsonl(p)
    if kind == ".json":
        return _iter_json(p)
    if kind in (".csv", ".tsv"):
        return _iter_csv(p, "\t" if kind == ".tsv" else ",")
    if kind == ".parquet":
        return _iter_parquet(p)
    raise DataError(f"unknown file type '{kind or p.name}' (use .jsonl, .json, .csv, .tsv, .parquet, optionally .gz)",
                    file=str(p))


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, row dict) from jsonl / json / csv / tsv / parquet (optionally .gz); raise `DataError` on bad rows.

    `line` is the 1-based line where the record starts (text formats) or the 1-based row number (parquet).
    """
    for i, row in _iter_any(path):
        if isinstance(row, DataError):
            raise row
        yield i, row


def _iter_hf(spec: str) -> Iterator[RowOrError]:
    """Rows of a Hugging Face dataset: 'hf:NAME[:SPLIT]' (needs the `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError("'hf:' inputs need the `datasets` package (pip install datasets)", file=spec) from None
    parts = spec[3:].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # not found, offline, bad split: `datasets` raises many types
        raise DataError(f"cannot load dataset '{name}' split '{split}': {e}", file=spec) from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


# --------------------------------------------------------------------------- converters

HH_ASSISTANT = "\n\nAssistant:"
SCHEMA_FIELDS = ("prompt", "chosen", "rejected", "id", "source")


class _RowError(ValueError):
    """A bad value in one row: the (schema or column) field and what is wrong with it."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split hh-rlhf transcripts at the last '\\n\\nAssistant:' into (prompt, chosen reply, rejected reply).

    The prompt is the chosen transcript's dialogue up to and including the final 'Assistant:' tag
    (Bai et al. 2022); in a few pairs the two prefixes differ and the chosen one is kept.
    """
    ic, ir = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    for name, i in (("chosen", ic), ("rejected", ir)):
        if i < 0:
            raise _RowError(name, "no '\\n\\nAssistant:' turn (not an hh-rlhf transcript)")
    cut = len(HH_ASSISTANT)
    return chosen[: ic + cut].strip(), chosen[ic + cut:].strip(), rejected[ir + cut:].strip()


def _text(row: Mapping[str, Any], key: str) -> str:
    v = row.get(key)
    if key not in row:
        keys = ", ".join(sorted(map(str, row))[:10])
        raise _RowError(key, f"missing (row has: {keys})")
    if v is None:
        raise _RowError(key, "is null, expected text")
    if not isinstance(v, str):
        raise _RowError(key, f"expected text, got {type(v).__name__}")
    return v


def _hh_pair(row: Mapping[str, Any], fields: Mapping[str, str]) -> Pair:
    c_raw, r_raw = _text(row, fields.get("chosen", "chosen")), _text(row, fields.get("rejected", "rejected"))
    prompt, chosen, rejected = split_hh(c_raw, r_raw)
    same = c_raw[: c_raw.rfind(HH_ASSISTANT)] == r_raw[: r_raw.rfind(HH_ASSISTANT)]
    return Pair(prompt, chosen, rejected, source="hh-rlhf", meta={} if same else {"prefix_mismatch": True})


def _preference(row: Mapping[str, Any]) -> float:
    pref = row.get("preference")
    if "preference" not in row or pref == "":
        raise _RowError("preference", "missing judge preference")
    if pref is None:
        raise _RowError("preference", "is null, expected a number in [1, 2]")
    if isinstance(pref, bool):
        raise _RowError("preference", f"expected a number in [1, 2], got {pref!r}")
    try:
        v = float(pref)
    except (TypeError, ValueError):
        raise _RowError("preference", f"not a number: {pref!r}") from None
    if not 1.0 <= v <= 2.0:
        raise _RowError("preference", f"{v} outside [1, 2]")
    return v


def _alpaca_pair(row: Mapping[str, Any], report: LoadReport) -> Pair | None:
    """AlpacaEval annotation → pair: preference > 1.5 means output_2 won, < 1.5 output_1; 1.5 is a tie (None)."""
    v = _preference(row)
    o1, o2, prompt = _text(row, "output_1"), _text(row, "output_2"), _text(row, "instruction")
    if v == 1.5:
        report.ties += 1
        return None
    chosen, rejected = (o2, o1) if v > 1.5 else (o1, o2)
    meta = {"preference": v, "generator_1": row.get("generator_1"), "generator_2": row.get("generator_2"),
            "annotator": row.get("annotator")}
    src = row.get("dataset")
    return Pair(prompt, chosen, rejected, source=None if src is None else str(src), meta=meta)


def _generic_pair(row: Mapping[str, Any], fields: Mapping[str, str]) -> Pair:
    prompt = _text(row, fields.get("prompt", "prompt"))
    chosen = _text(row, fields.get("chosen", "chosen"))
    rejected = _text(row, fields.get("rejected", "rejected"))
    rid, src, meta = row.get(fields.get("id", "id")), row.get(fields.get("source", "source")), row.get("meta")
    if src is None and "source" not in fields:
        src = row.get("subset")  # RewardBench's name for the column
    return Pair(prompt, chosen, rejected, id=None if rid is None else str(rid),
                source=None if src is None else str(src), meta=meta if isinstance(meta, dict) else {})


def _row_to_pair(row: Mapping[str, Any], fmt: DataFormat, fields: Mapping[str, str],
                 report: LoadReport) -> Pair | None:
    """Convert one raw row; raises `_RowError` on bad rows, returns None for AlpacaEval ties."""
    if fmt is DataFormat.HH:
        return _hh_pair(row, fields)
    if fmt is DataFormat.ALPACA_EVAL:
        return _alpaca_pair(row, report)
    return _generic_pair(row, fields)


def _detect(row: Mapping[str, Any], fields: Mapping[str, str]) -> DataFormat:
    """Guess the layout from one row: AlpacaEval keys, hh transcripts (no prompt column), else generic pairs."""
    keys = set(row)
    if {"instruction", "output_1", "output_2", "preference"} <= keys:
        return DataFormat.ALPACA_EVAL
    chosen = row.get(fields.get("chosen", "chosen"))
    if fields.get("prompt", "prompt") not in keys and isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return DataFormat.HH
    return DataFormat.PAIRS


def validate_pair(pair: Pair) -> None:
    """Raise ValueError (with `.field`) if a pair cannot be trained on: non-text, empty or identical responses."""
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(getattr(pair, name), str):
            raise _RowError(name, f"expected text, got {type(getattr(pair, name)).__name__}")
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise _RowError(name, "empty response")
    if pair.chosen.strip() == pair.rejected.strip():
        raise _RowError("rejected", "identical to chosen")


def _check_fields(fields: Mapping[str, str]) -> dict[str, str]:
    unknown = set(fields) - set(SCHEMA_FIELDS)
    if unknown:
        raise ValueError(f"field mapping names must be among {', '.join(SCHEMA_FIELDS)}; got {sorted(unknown)}")
    return dict(fields)


def _skip_or_raise(err: DataError, skip_invalid: bool, report: LoadReport) -> None:
    if not skip_invalid:
        raise err from None  # the message says it all: no chained traceback
    report.skipped += 1
    if len(report.errors) < 5:
        report.errors.append(str(err))


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
    `annotator` filters AlpacaEval annotations to one judge (None keeps all); ties are counted in `report.ties`.
    """
    fmt = DataFormat(format)
    fields = _check_fields(fields or {})
    report = report if report is not None else LoadReport()
    name = str(path)
    rows: Iterable[RowOrError] = _iter_hf(name) if name.startswith("hf:") else _iter_any(path)
    out: list[Pair] = []
    for line, row in rows:
        if isinstance(row, DataError):
            _skip_or_raise(row, skip_invalid, report)
            continue
        if fmt is DataFormat.AUTO:
            fmt = _detect(row, fields)
        if fmt is DataFormat.ALPACA_EVAL and annotator is not None and row.get("annotator") not in (None, annotator):
            report.filtered += 1
            continue
        try:
            pair = _row_to_pair(row, fmt, fields, report)
            if pair is None:
                continue
            validate_pair(pair)
        except _RowError as e:
            _skip_or_raise(DataError(e.message, file=name, line=line, field=e.field), skip_invalid, report)
            continue
        if pair.id is None:
            pair = dataclasses.replace(pair, id=f"{Path(name).name}:{line}")
        out.append(pair)
        if limit is not None and len(out) >= limit:
            break
    report.kept = len(out)
    return out


def save_pairs(pairs: Iterable[Pair], path: str | Path) -> None:
    """Write pairs as jsonl (atomically)."""
    from bayesrm.io import atomic_write_text, jsonl_text

    atomic_write_text(path, jsonl_text(path, (p.to_dict() for p in pairs)))


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


def pair_hash(p: Pair) -> int:
    """A 63-bit hash of one pair's (prompt, chosen, rejected) texts, stable across processes and runs."""
    h = hashlib.blake2b(digest_size=8)
    for t in (p.prompt, p.chosen, p.rejected):
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") >> 1


def pairs_fingerprint(pairs: Sequence[Pair]) -> str:
    """SHA-256 of the (prompt, chosen, rejected) texts in order: the identity of a training set."""
    h = hashlib.sha256()
    for p in pairs:
        for t in (p.prompt, p.chosen, p.rejected):
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()
