"""Pair schema, loaders for each format, real hh-rlhf / AlpacaEval rows, validation messages and splits."""

from __future__ import annotations

import csv
import gzip
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bayesrm.data import (
    DataError,
    DataFormat,
    LoadReport,
    Pair,
    iter_rows,
    load_pairs,
    save_pairs,
    split_by_prompt,
    split_hh,
    split_prompts,
)

FIXTURES = Path(__file__).parent / "data"
HH = FIXTURES / "hh_harmless_test_40.jsonl.gz"
AE = FIXTURES / "alpaca_eval_annotations_60.jsonl.gz"

# awkward text on purpose: commas, quotes, newlines, tabs and non-ASCII survive every format
PAIRS = [
    Pair("What is 2+2?", "4", "5", id="a", source="maths"),
    Pair('Say "hi", politely', "Hello,\nthere", "hi", id="b", source="chat"),
    Pair("Übersetze: cat", "Katze", "Hund\tdog", id="c", source="de"),
]
COLUMNS = ("prompt", "chosen", "rejected", "id", "source")


def _rows(pairs: list[Pair] = PAIRS) -> list[dict[str, Any]]:
    return [p.to_dict() for p in pairs]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    text = json.dumps(rows, indent=2, ensure_ascii=False)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    delimiter = "\t" if ".tsv" in path.suffixes else ","
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], None]] = {
    "pairs.jsonl": _write_jsonl, "pairs.jsonl.gz": _write_jsonl, "pairs.json": _write_json,
    "pairs.json.gz": _write_json, "pairs.csv": _write_csv, "pairs.csv.gz": _write_csv, "pairs.tsv": _write_csv,
    "pairs.parquet": _write_parquet,
}


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_format_round_trips(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    WRITERS[name](path, _rows())
    rep = LoadReport()
    got = load_pairs(path, report=rep)
    assert got == PAIRS  # compares prompt, chosen, rejected, id and source
    assert (rep.kept, rep.skipped, rep.ties) == (3, 0, 0)


def test_save_pairs_round_trips_meta(tmp_path: Path) -> None:
    pairs = [Pair("p", "c", "r", id="x", meta={"k": [1, 2]}), Pair("q", "c2", "r2", source="s")]
    save_pairs(pairs, tmp_path / "out.jsonl")
    got = load_pairs(tmp_path / "out.jsonl")
    assert got[0] == pairs[0] and got[0].meta == {"k": [1, 2]}
    assert got[1].source == "s" and got[1].id == "out.jsonl:2"  # a missing id becomes file:line


def test_field_mapping(tmp_path: Path) -> None:
    rows = [{"question": p.prompt, "good": p.chosen, "bad": p.rejected, "uid": p.id, "origin": p.source}
            for p in PAIRS]
    _write_csv(tmp_path / "mapped.csv", rows)
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid", "source": "origin"}
    assert load_pairs(tmp_path / "mapped.csv", fields=fields) == PAIRS
    with pytest.raises(ValueError, match="promt"):
        load_pairs(tmp_path / "mapped.csv", fields={"promt": "question"})


def test_rewardbench_subset_column_is_the_source(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "rb.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "hep-go"},
                                         {"prompt": "q", "chosen": "a", "rejected": "b", "subset": "x",
                                          "source": "y"}])
    assert [p.source for p in load_pairs(tmp_path / "rb.jsonl")] == ["hep-go", "y"]
    # an explicit mapping wins and does not fall back
    assert [p.source for p in load_pairs(tmp_path / "rb.jsonl", fields={"source": "origin"})] == [None, None]


def test_field_mapping_missing_column_names_the_column(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'answer_a': missing \(row has: bad, good, question\)"):
        load_pairs(tmp_path / "m.jsonl", fields={"prompt": "question", "chosen": "answer_a", "rejected": "bad"})


def test_json_wrapped_and_column_oriented(tmp_path: Path) -> None:
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": _rows()}))
    cols = {k: [r[k] for r in _rows()] for k in COLUMNS}
    (tmp_path / "columns.json").write_text(json.dumps(cols))
    assert load_pairs(tmp_path / "wrapped.json") == PAIRS
    assert load_pairs(tmp_path / "columns.json") == PAIRS
    (tmp_path / "ragged.json").write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["c"]}))
    with pytest.raises(DataError, match=r"ragged\.json: expected a list of objects"):
        load_pairs(tmp_path / "ragged.json")


def test_hf_prefix_uses_datasets_with_split_and_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, split))
        return [{"q": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    got = load_pairs("hf:org/prefs:test", fields={"prompt": "q"})
    assert calls == [("org/prefs", "test")]
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(p.prompt, p.chosen, p.rejected) for p in PAIRS]
    load_pairs("hf:org/prefs", fields={"prompt": "q"})
    assert calls[-1] == ("org/prefs", "train")


def test_hf_load_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"hf:nope/x:dev: cannot load dataset 'nope/x' split 'dev': Dataset 'nope/x'"):
        load_pairs("hf:nope/x:dev")


def test_hf_prefix_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="hf:x: 'hf:' inputs need the `datasets` package"):
        load_pairs("hf:x")


def test_limit_stops_early(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "p.jsonl", [*_rows(), {"broken": True}])
    assert load_pairs(tmp_path / "p.jsonl", limit=2) == PAIRS[:2]


# --------------------------------------------------------------------------- hh-rlhf


def test_split_hh_multi_turn() -> None:
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:  go away "
    assert split_hh(c, r) == ("Human: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
                              "fine, thanks", "go away")


def test_hh_real_rows_split_into_shared_prompt_and_final_replies() -> None:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    rep = LoadReport()
    pairs = load_pairs(HH, skip_invalid=True, report=rep)
    assert (rep.kept, rep.skipped) == (39, 1)  # line 39: the chosen transcript ends in an empty reply
    assert rep.errors[0].endswith("hh_harmless_test_40.jsonl.gz:39: field 'chosen': empty response")
    kept = [r for i, r in enumerate(raw, 1) if i != 39]
    for pair, row in zip(pairs, kept, strict=True):
        assert pair.prompt.startswith("Human:") and pair.prompt.endswith("\n\nAssistant:")
        assert row["chosen"].startswith("\n\n" + pair.prompt)
        assert row["chosen"].rstrip().endswith(pair.chosen) and row["rejected"].rstrip().endswith(pair.rejected)
        assert "\n\nAssistant:" not in pair.chosen and "\n\nAssistant:" not in pair.rejected
        assert pair.source == "hh-rlhf"
    assert pairs[0].prompt.startswith("Human: what are some pranks with a pen i can do?")
    assert pairs[0].chosen.endswith("you can get funny results by doing pranks with pens.")
    assert [p.meta.get("prefix_mismatch", False) for p in pairs].count(True) == 1  # original line 1255
    assert pairs[-1].meta == {"prefix_mismatch": True}
    assert load_pairs(HH, format="hh", skip_invalid=True) == pairs  # auto-detection picks hh


def test_hh_without_skip_names_the_empty_reply() -> None:
    with pytest.raises(DataError, match=r"hh_harmless_test_40\.jsonl\.gz:39: field 'chosen': empty response"):
        load_pairs(HH)


def test_hh_format_on_non_transcripts_names_the_field(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns"}])
    with pytest.raises(DataError, match=r"h\.jsonl:1: field 'rejected': no '\\n\\nAssistant:' turn"):
        load_pairs(tmp_path / "h.jsonl", format=DataFormat.HH)


# --------------------------------------------------------------------------- AlpacaEval


def _ae_raw() -> list[dict[str, Any]]:
    with gzip.open(AE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_alpaca_eval_real_rows_orientation_ties_and_invalid() -> None:
    raw = _ae_raw()
    judge = "weighted_alpaca_eval_gpt4_turbo"
    mine = [r for r in raw if r["annotator"] == judge]
    rep = LoadReport()
    pairs = load_pairs(AE, skip_invalid=True, report=rep)
    assert rep.filtered == len(raw) - len(mine) == 20
    assert rep.ties == sum(r["preference"] == 1.5 for r in mine) == 1  # the reference judged against itself
    assert rep.skipped == 1 and "field 'rejected': empty response" in rep.errors[0]  # gemma-2b-it's empty output
    assert rep.kept == len(pairs) == len(mine) - 2
    by_out2 = {(r["instruction"], r["output_2"]): r for r in mine}
    for p in pairs:
        assert p.meta["annotator"] == judge
        pref = p.meta["preference"]
        out2 = p.chosen if pref > 1.5 else p.rejected
        row = by_out2[(p.prompt, out2)]
        assert row["preference"] == pref and row["generator_2"] == p.meta["generator_2"]
        assert {p.chosen, p.rejected} == {row["output_1"], row["output_2"]}
        assert p.source == row["dataset"]
    wins = sum(p.meta["preference"] > 1.5 for p in pairs)
    assert 0 < wins < len(pairs) and wins == sum(r["preference"] > 1.5 for r in mine)  # both orientations occur


def test_alpaca_eval_annotator_filter_and_all_judges() -> None:
    raw = _ae_raw()
    fn = load_pairs(AE, annotator="alpaca_eval_gpt4_turbo_fn")  # these 7 rows are all valid
    assert len(fn) == sum(r["annotator"] == "alpaca_eval_gpt4_turbo_fn" for r in raw) == 7
    assert {p.meta["annotator"] for p in fn} == {"alpaca_eval_gpt4_turbo_fn"}
    rep = LoadReport()
    every = load_pairs(AE, annotator=None, skip_invalid=True, report=rep)
    assert rep.ties == sum(r["preference"] == 1.5 for r in raw) == 2  # the reference vs itself, two judges
    assert rep.skipped == 2  # the null preference (cot judge) and the empty output
    assert any("field 'preference': is null" in e for e in rep.errors)  # null is not reported as missing
    assert len(every) == len(raw) - 2 - 2 and rep.filtered == 0


@pytest.mark.parametrize(("pref", "message"), [
    (2.5, "field 'preference': 2.5 outside [1, 2]"),
    ("abc", "field 'preference': not a number: 'abc'"),
    (True, "field 'preference': expected a number in [1, 2], got True"),
])
def test_alpaca_eval_bad_preference(tmp_path: Path, pref: Any, message: str) -> None:
    row = {"instruction": "i", "output_1": "a", "output_2": "b", "preference": pref}
    _write_jsonl(tmp_path / "ae.jsonl", [row])
    with pytest.raises(DataError, match=rf"ae\.jsonl:1: {message}".replace("[", r"\[").replace("]", r"\]")):
        load_pairs(tmp_path / "ae.jsonl")


def test_alpaca_eval_synthetic_orientation(tmp_path: Path) -> None:
    rows = [{"instruction": "i", "output_1": "ref", "output_2": "model", "preference": v} for v in (1, 1.2, 1.5, 2)]
    _write_jsonl(tmp_path / "ae.jsonl", rows)
    rep = LoadReport()
    got = load_pairs(tmp_path / "ae.jsonl", report=rep)
    assert [(p.chosen, p.rejected) for p in got] == [("ref", "model"), ("ref", "model"), ("model", "ref")]
    assert rep.ties == 1


# --------------------------------------------------------------------------- validation

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
BAD_LINES = [
    ('{"prompt": "p", "chosen": "yes"', "malformed JSON", None),
    ('["p", "yes", "no"]', "expected a JSON object, got list", None),
    (json.dumps({"prompt": "p", "chosen": "yes"}), "missing", "rejected"),
    (json.dumps({"prompt": "p", "chosen": "yes", "rejected": None}), "is null, expected text", "rejected"),
    (json.dumps({"prompt": "p", "chosen": "", "rejected": "no"}), "empty response", "chosen"),
    (json.dumps({"prompt": "p", "chosen": "yes", "rejected": "  \n"}), "empty response", "rejected"),
    (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same "}), "identical to chosen", "rejected"),
    (json.dumps({"prompt": 7, "chosen": "yes", "rejected": "no"}), "expected text, got int", "prompt"),
    (json.dumps({"prompt": "p", "chosen": ["yes"], "rejected": "no"}), "expected text, got list", "chosen"),
    (json.dumps({"prompt": "p", "chosen": "yes", "rejected": {"t": 1}}), "expected text, got dict", "rejected"),
]


@pytest.mark.parametrize(("line", "message", "field"), BAD_LINES)
def test_invalid_jsonl_line_names_file_line_and_field(tmp_path: Path, line: str, message: str,
                                                      field: str | None) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")  # bad record on line 3
    with pytest.raises(DataError) as info:
        load_pairs(path)
    e = info.value
    assert (e.file, e.line, e.field) == (str(path), 3, field)
    where = f"{path}:3: " + (f"field '{field}': " if field else "")
    assert str(e).startswith(where) and message in str(e)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)  # no chained traceback


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD)] + [bad for bad, _, _ in BAD_LINES] + [json.dumps(GOOD | {"chosen": "sure"})]
    path.write_text("\n".join(lines) + "\n")
    rep = LoadReport()
    got = load_pairs(path, skip_invalid=True, report=rep)
    assert [p.chosen for p in got] == ["yes", "sure"]
    assert (rep.kept, rep.skipped) == (2, len(BAD_LINES))
    assert rep.errors[0].startswith(f"{path}:2: malformed JSON") and len(rep.errors) == 5
    assert rep.errors[2] == f"{path}:4: field 'rejected': missing (row has: chosen, prompt)"


def test_json_array_errors_point_at_the_item_line(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([GOOD, GOOD | {"chosen": 3}], indent=2))  # the second object starts on line 7
    with pytest.raises(DataError, match=r"arr\.json:7: field 'chosen': expected text, got int"):
        load_pairs(path)
    path.write_text('[\n  {"prompt": "p",\n   "chosen": }\n]')
    with pytest.raises(DataError, match=r"arr\.json:3: malformed JSON"):
        load_pairs(path)


def test_csv_errors_point_at_the_record_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('prompt,chosen,rejected\np,"multi\nline",no\np,yes\np,a,b,extra\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:4: field 'rejected': missing"):
        load_pairs(path)  # line 4: the short row after a record spanning lines 2-3
    rep = LoadReport()
    assert [p.chosen for p in load_pairs(path, skip_invalid=True, report=rep)] == ["multi\nline"]
    assert rep.skipped == 2 and rep.errors[1] == f"{path}:5: 1 more values than header columns"


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,chosen,rejected\np,yes,no\n".encode())
    assert load_pairs(path) == [Pair("p", "yes", "no", id="excel.csv:2")]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("pairs.txt", "x", "unknown file type '.txt'"),
    ("broken.parquet", "not parquet", "broken.parquet: cannot read parquet"),
    ("broken.json", '{"a": ', "broken.json:1: malformed JSON"),
])
def test_bad_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_pairs(tmp_path / name)


def test_iter_rows_raises_on_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    it = iter_rows(path)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(DataError, match=r"r\.jsonl:2: malformed JSON"):
        next(it)


# --------------------------------------------------------------------------- splits


def _many_pairs(n_prompts: int = 300) -> list[Pair]:
    return [Pair(f"prompt {i}", f"good {i} {j}", f"bad {i} {j}") for i in range(n_prompts) for j in range(1 + i % 3)]


def test_split_by_prompt_is_disjoint_complete_and_respects_fractions() -> None:
    pairs = _many_pairs()
    parts = split_by_prompt(pairs, (0.8, 0.1, 0.1), seed=0)
    prompts = [{p.prompt for p in part} for part in parts]
    assert all(not (a & b) for i, a in enumerate(prompts) for b in prompts[i + 1:])
    assert sum(len(p) for p in parts) == len(pairs) and set().union(*prompts) == {p.prompt for p in pairs}
    assert [len(s) for s in prompts] == [240, 30, 30]  # fractions of the 300 unique prompts
    for part in parts:  # the input order is kept within each part
        assert part == sorted(part, key=pairs.index)


def test_split_is_seeded_and_deterministic() -> None:
    pairs = _many_pairs()
    a = split_by_prompt(pairs, (0.5, 0.5), seed=3)
    assert a == split_by_prompt(pairs, (0.5, 0.5), seed=3)
    rev = split_by_prompt(list(reversed(pairs)), (0.5, 0.5), seed=3)
    assert [{p.prompt for p in x} for x in a] == [{p.prompt for p in x} for x in rev]  # input order does not matter
    b = split_by_prompt(pairs, (0.5, 0.5), seed=4)
    assert {p.prompt for p in a[0]} != {p.prompt for p in b[0]}


def test_split_prompts_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_prompts(["a", "b"], (0.5, 0.6))
    with pytest.raises(ValueError, match="non-negative"):
        split_prompts(["a", "b"], (1.5, -0.5))
