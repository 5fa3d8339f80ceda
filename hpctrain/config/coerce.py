"""Turn raw values (TOML values, or CLI strings) into a field's declared type, or say why not.

Rules: bools take true/false (CLI also yes/no/1/0, and a bare flag means true); ints refuse fractions;
floats take ints and '1e-5'; lists take several values (a single TOML scalar becomes a one-item list);
dicts take a TOML table, a JSON object string, or KEY=VALUE items; an optional field takes "none"/"null"
(unless "none" is one of its choices, e.g. position_embedding_type).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any

from hpctrain.config.errors import ConfigError
from hpctrain.config.fields import field_choices
from hpctrain.config.sections import SECTIONS

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


@functools.lru_cache(maxsize=None)
def field_type(section: str, name: str) -> Any:
    """The resolved annotation of ``section.name`` (e.g. ``int | None``, ``list[str]``)."""
    return typing.get_type_hints(SECTIONS[section])[name]


@functools.lru_cache(maxsize=None)
def _choices(section: str, name: str) -> tuple | None:
    return field_choices(next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name))


def split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``; (tp, False) otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def parse_bool(text: Any) -> bool:
    """true/false (also yes/no, on/off, 1/0, any case) -> bool; ValueError naming the value otherwise."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise ValueError(f"expected true or false, got {text!r}")


def _is_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def type_name(tp: Any) -> str:
    inner, optional = split_optional(tp)
    if typing.get_origin(inner) is list:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    elif _is_dict(inner):
        name = "table/dict"
    else:
        name = inner.__name__
    return f"{name} or none" if optional else name


def _fail(where: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{where}: value {value!r} is not a valid {type_name(tp)}{extra}")


def _number(value: Any, inner: type, where: str, tp: Any, from_cli: bool) -> Any:
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and from_cli:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _fail(where, value, tp, " (expected a whole number, e.g. 4)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and from_cli:
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(where, value, tp, " (expected a number, e.g. 1e-5)")


def _scalar(value: Any, inner: type, where: str, tp: Any, from_cli: bool) -> Any:
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return parse_bool(value)
        raise _fail(where, value, tp, " (use true or false)")
    if inner in (int, float):
        return _number(value, inner, where, tp, from_cli)
    if inner is str:
        if isinstance(value, str):
            return value
        raise _fail(where, value, tp, " (expected a string; quote it in TOML)")
    raise TypeError(f"unhandled config type {inner!r} at {where}")


def _dict(value: Any, inner: Any, where: str, tp: Any) -> dict:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and \
            value[0].strip().startswith("{"):
        value = value[0]
    if isinstance(value, dict):
        out = value
    elif isinstance(value, str) and value.strip().startswith("{"):
        try:
            out = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: {value!r} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(out, dict):
            raise _fail(where, value, tp)
    elif isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        out = dict(v.split("=", 1) for v in value)
    else:
        raise _fail(where, value, tp, " (use a TOML table, a JSON object or KEY=VALUE items)")
    args = typing.get_args(inner)
    if args and args[1] is str:
        bad = {k: v for k, v in out.items() if not isinstance(v, str)}
        if bad:
            raise ConfigError(f"{where}: values must be strings; got {bad!r} (quote them)")
    return dict(out)


def _is_none(section: str, name: str, value: Any, optional: bool) -> bool:
    if value is None:
        return True
    return (optional and isinstance(value, str) and value.strip().lower() in _NONE
            and value not in (_choices(section, name) or ()))


def coerce(section: str, name: str, value: Any, *, from_cli: bool = False, where: str | None = None) -> Any:
    """Convert ``value`` to the type of ``section.name``; raise ConfigError naming ``where``."""
    tp = field_type(section, name)
    where = where or f"config key '{section}.{name}'"
    inner, optional = split_optional(tp)
    is_list = typing.get_origin(inner) is list
    if isinstance(value, list) and len(value) == 1 and not is_list and not _is_dict(inner):
        value = value[0]  # a CLI scalar arrives as a one-item list
    if _is_none(section, name, value, optional):
        if optional:
            return None
        raise ConfigError(f"{where}: cannot be none; expected {type_name(tp)}")
    if is_list:
        item = typing.get_args(inner)[0]
        items = value if isinstance(value, list) else [value]
        out = [_scalar(v, item, f"{where}[{i}]", item, from_cli) for i, v in enumerate(items)]
    elif _is_dict(inner):
        out = _dict(value, inner, where, tp)
    elif isinstance(value, list):
        raise ConfigError(f"{where}: takes one value, got {len(value)}: {value!r} "
                          "(a missing '--' before a flag name?)")
    else:
        out = _scalar(value, inner, where, tp, from_cli)
    check_choices(section, name, out, where)
    return out


def check_choices(section: str, name: str, value: Any, where: str | None = None) -> None:
    """Raise if ``value`` (or any item of a list) is not one of the field's choices."""
    choices = _choices(section, name)
    if not choices or value is None:
        return
    where = where or f"config key '{section}.{name}'"
    for v in value if isinstance(value, list) else [value]:
        if v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of the choices: {', '.join(map(str, choices))}")
