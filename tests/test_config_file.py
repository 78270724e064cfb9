"""Config files and `--set KEY=VALUE` overrides: parsed, checked against the dataclass fields, one clear line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bayesrm.config_file import apply_overrides, fill, load_config, parse_override


@dataclass
class Inner:
    max_length: int = 500
    lr: float = 2e-4


@dataclass
class Outer:
    steps: int = 40
    cap: int | None = None
    name: str = "x"
    flag: bool = False
    ks: list[float] = field(default_factory=lambda: [1.0])
    runs: dict[str, str] = field(default_factory=lambda: {"map": "map"})
    inner: Inner = field(default_factory=Inner)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_overrides_are_typed_nested_and_beat_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, 'steps = 30\nname = "file"\n[inner]\nmax_length = 256\n')
    cfg = load_config(Outer, p, ["steps=2", "cap=50", "name=examples/pool.jsonl", "flag=true", "ks=[1, 2.5]",
                                 "inner.max_length=128", "inner.lr=1", "runs.la=la:var:k=4"])
    assert (cfg.steps, cfg.cap, cfg.name, cfg.flag) == (2, 50, "examples/pool.jsonl", True)
    assert cfg.ks == [1.0, 2.5] and all(isinstance(k, float) for k in cfg.ks)
    assert cfg.inner == Inner(max_length=128, lr=1.0) and isinstance(cfg.inner.lr, float)
    assert cfg.runs == {"la": "la:var:k=4"}  # a table set from the command line (the file had none)
    assert load_config(Outer, p).steps == 30 and load_config(Outer, p, ["cap=50"]).inner.max_length == 256


@pytest.mark.parametrize(("item", "message"), [
    ("stepz=2", "--set stepz=2: unknown field 'stepz'; valid: ['cap', 'flag', 'inner', 'ks', 'name', 'runs', 'steps']"),
    ("inner.foo=1", "--set inner.foo=1: unknown field 'inner.foo'; valid: ['lr', 'max_length']"),
    ("steps=abc", "--set steps=abc: expected int, got 'abc'"),
    ("steps=2.5", "--set steps=2.5: expected int, got 2.5"),
    ("cap=true", "--set cap=true: expected int | None, got True"),
    ("ks=[1, \"a\"]", "--set ks=[1, \"a\"][1]: expected float, got 'a'"),
    ("inner=3", "--set inner=3: 'inner' is a section; set its fields, e.g. inner.FIELD=VALUE"),
    ("steps.x=1", "--set steps.x=1: 'steps' has no sub-fields"),
    ("steps", "--set steps: expected KEY=VALUE"),
])
def test_bad_overrides_fail_with_one_line(item: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        apply_overrides(Outer, {}, [item])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_file_values_are_type_checked_too(tmp_path: Path) -> None:
    """Before: a mistyped value in a TOML file reached the experiment (e.g. steps = "2" failed deep inside TRL)."""
    with pytest.raises(ValueError, match=r"c\.toml\.steps: expected int, got '2'"):
        load_config(Outer, _write(tmp_path, 'steps = "2"\n'))
    with pytest.raises(ValueError, match=r"c\.toml\.inner: expected a table of Inner fields"):
        load_config(Outer, _write(tmp_path, "inner = 3\n"))
    with pytest.raises(ValueError, match="unknown field"):
        fill(Outer, {"nope": 1}, "where")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.toml")


def test_values_parse_as_toml_else_text() -> None:
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("x=la:var:k=1") == (["x"], "la:var:k=1")  # only the first '=' splits
    assert parse_override('x="quoted"') == (["x"], "quoted")
    assert parse_override("x=[\"map\"]") == (["x"], ["map"])


def test_repository_configs_load_with_overrides() -> None:
    from bayesrm.experiment import load_config as load_bon
    from bayesrm.rlhf import load_config as load_rlhf

    root = Path(__file__).resolve().parents[1]
    bon = load_bon(root / "configs" / "bon_alpaca.toml", ["train_prompts=50", "model.max_length=128"])
    assert (bon.train_prompts, bon.model.max_length, bon.members) == (50, 128, 4)
    for f in ("configs/rlhf_cpu.toml", "examples/rlhf.toml"):
        assert load_rlhf(root / f, ["steps=3", "policy.lora_layers=1"]).steps == 3
    assert load_bon(root / "examples" / "bon.toml").pool == "examples/pool.jsonl"


@dataclass
class Parent:
    inner: Inner = field(default_factory=lambda: Inner(max_length=64, lr=0.5))  # the parent's own section default
    deep: Outer = field(default_factory=lambda: Outer(inner=Inner(max_length=7)))


def test_a_partial_section_keeps_the_parents_defaults_for_the_fields_it_leaves_out(tmp_path: Path) -> None:
    # before the fix, `[inner] lr = 1` rebuilt Inner from its class defaults and max_length became 500
    p = _write(tmp_path, "[inner]\nlr = 1\n[deep.inner]\nlr = 3\n")
    cfg = load_config(Parent, p, ["deep.steps=5"])
    assert cfg.inner == Inner(max_length=64, lr=1.0)
    assert cfg.deep.steps == 5 and cfg.deep.inner == Inner(max_length=7, lr=3.0)
    assert load_config(Parent, _write(tmp_path, ""), ["inner.max_length=9"]).inner == Inner(max_length=9, lr=0.5)
