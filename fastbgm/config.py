"""Typed configs: dataclasses read from TOML (or dicts), with dotted overrides.

``load(RunConfig, "run.toml", ["--optim.lr=0.05"])`` builds the dataclass tree,
coercing TOML and command-line strings to each field's type. An unknown key is an
error naming the closest valid one; a bad value is an error naming its key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the message names the key and what is wrong."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        t = hints[name]
        if dataclasses.is_dataclass(t):
            out.extend(_all_keys(t, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def unknown_key_error(key: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        tail = key.rsplit(".", 1)[-1]
        close = [v for v in valid if v.rsplit(".", 1)[-1] == tail][:1]
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        (inner,) = args[:1] or (str,)
        if dataclasses.is_dataclass(inner):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list of tables, got {value!r}")
            return [from_dict(inner, v, f"{key}[{i}].") for i, v in enumerate(value)]
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise unknown_key_error(key, [f"{prefix}{x}" for x in _all_keys(cls)])
        t = hints[k]
        kwargs[k] = from_dict(t, v, f"{key}.") if dataclasses.is_dataclass(t) else _coerce(v, t, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            # checks name their key by section ("datasets.train"); say which table it was
            section = re.sub(r"\[\d+\]$", "", prefix.rstrip("."))
            msg = prefix + (msg[len(section) + 1:] if msg.startswith(section + ".") else msg)
        raise ConfigError(msg) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "t": [{"c": 2}]}`` -> ``{"a.b": 1, "t.0.c": 2}`` (lists of
    tables are indexed; other lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{prefix}{k}.{i}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts, skipping keys under
    the ``ignore`` prefixes (such as ``speed.``: how fast a run goes is not what it is)."""
    was, now = flatten(old), flatten(new)
    return sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k) and not k.startswith(ignore))


def parse_overrides(args: Iterable[str]) -> dict[str, str]:
    """``--a.b=c`` / ``a.b=c`` / ``--a.b c`` -> {"a.b": "c"}."""
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        a = items[i]
        key = a[2:] if a.startswith("--") else a
        if "=" in key:
            k, v = key.split("=", 1)
        elif i + 1 < len(items):
            k, v = key, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{a}' has no value: write --{key}=VALUE")
        out[k] = v
        i += 1
    return out


def _table_list_item(cls: type, name: str) -> type | None:
    """The element dataclass when field ``name`` of ``cls`` is a list of tables."""
    t = typing.get_type_hints(cls).get(name)
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t) or (None,)
        if item is not None and dataclasses.is_dataclass(item):
            return item
    return None


def apply_overrides(data: dict[str, Any], overrides: dict[str, str], cls: type) -> dict[str, Any]:
    valid = _all_keys(cls)
    for key, value in overrides.items():
        parts = key.split(".")
        item = _table_list_item(cls, parts[0]) if len(parts) >= 3 and parts[1].isdigit() else None
        if item is not None:  # --datasets.0.subset=4000: one field of one table in a list
            rest = ".".join(parts[2:])
            if rest not in _all_keys(item):
                raise unknown_key_error(rest, _all_keys(item))
            tables = data.get(parts[0]) or []
            i = int(parts[1])
            if i >= len(tables):
                raise ConfigError(f"override '{key}': the config has {len(tables)} [[{parts[0]}]] table(s), "
                                  f"numbered from 0")
            node, parts = tables[i], parts[2:]
        elif key not in valid:
            raise unknown_key_error(key, valid)
        else:
            node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (or a JSON one, such as a run folder's config.json)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"config {p} is a folder: give a config file (e.g. configs/paper-mini.toml)")
    if p.suffix == ".json":
        import json

        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
         base: dict[str, Any] | None = None) -> T:
    data = dict(base or {})
    if path is not None:
        data.update(read_toml(path))
    return from_dict(cls, apply_overrides(data, parse_overrides(overrides), cls))


def check(cond: bool, key: str, message: str) -> None:
    """Raise ConfigError('key: message') unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {message}")
