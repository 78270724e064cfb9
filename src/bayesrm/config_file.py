"""Experiment configs: a TOML/JSON file plus `--set key=value` overrides, checked against the dataclass fields."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (ints widen to float); ValueError naming `where` when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list ({_name(hint)}), got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table ({_name(hint)}), got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if isinstance(hint, type) and not is_dataclass(hint) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    raise ValueError(f"{where}: expected {_name(hint)}, got {value!r}")


def fill(cls: type[T], data: dict[str, Any], where: str, base: T | None = None) -> T:
    """Build dataclass `cls` from a dict (nested tables for nested dataclasses), every value type-checked.

    Fields a table leaves out keep their defaults, including a parent's own default for a nested section (a
    `[gold.train]` table that sets only `max_steps` keeps the gold's learning rate, not TrainConfig's); with `base`,
    the table overrides that instance's fields.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; valid: {sorted(known)}")
    kw: dict[str, Any] = {}
    for k, v in data.items():
        if is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ValueError(f"{where}.{k}: expected a table of {_name(hints[k])} fields, got {v!r}")
            f = known[k]
            default = (getattr(base, k) if base is not None else f.default_factory()
                       if f.default_factory is not MISSING else None if f.default is MISSING else f.default)
            kw[k] = fill(hints[k], v, f"{where}.{k}", default)
        else:
            kw[k] = _coerce(v, hints[k], f"{where}.{k}")
    return cls(**kw) if base is None else replace(base, **kw)  # type: ignore[type-var]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` → (["a", "b"], value): VALUE read as a TOML value (50, 0.5, true, ["x"]) or else as text."""
    import tomllib

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item}: expected KEY=VALUE, e.g. --set steps=2 or --set model.max_length=128")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [k.strip() for k in key.split(".")], value


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> None:
    """Set each `--set KEY=VALUE` in `data` after checking KEY names a field of `cls` and VALUE fits its type."""
    for item in overrides:
        path, value = parse_override(item)
        where, target, hint = f"--set {item}", data, Any
        owner: Any = cls
        for i, key in enumerate(path):
            last = i == len(path) - 1
            if is_dataclass(owner):
                hints = typing.get_type_hints(owner)
                if key not in hints:
                    raise ValueError(f"{where}: unknown field {'.'.join(path[: i + 1])!r}; valid: {sorted(hints)}")
                hint = hints[key]
            elif typing.get_origin(owner) is dict:  # a key inside a table field, e.g. runs.la=la:var:k=1
                hint = typing.get_args(owner)[1] if typing.get_args(owner) else Any
            else:
                raise ValueError(f"{where}: {'.'.join(path[:i])!r} has no sub-fields")
            if last:
                if is_dataclass(hint):
                    raise ValueError(f"{where}: {key!r} is a section; set its fields, e.g. {key}.FIELD=VALUE")
                target[key] = _coerce(value, hint, where)
            else:
                target = target.setdefault(key, {})
                owner = hint


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw dict of a .toml or .json config file; one clear line when it is missing or does not parse."""
    import tomllib

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except ValueError as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{p}: cannot parse config: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config must be a table of fields, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Dataclass `cls` from a config file with `--set` overrides applied; unknown keys and bad values fail."""
    data = read_config(path)
    apply_overrides(cls, data, overrides)
    return fill(cls, data, str(path))
