"""Parse CLI overrides (``--key v1 v2 --other.key=v``) into typed {(section, field): value}.

Syntax: ``--name value`` (flat Megatron-SWIFT name), ``--section.name value`` (dotted),
``--name-with-dashes value`` (Megatron-LM spelling), ``--name=value``. A list field takes every value up to
the next ``--flag``; a bool flag given bare means true. Values are kept as strings and converted by coerce().
"""
from __future__ import annotations

import typing
from typing import Any

from hpctrain.config.coerce import field_type, split_optional
from hpctrain.config.errors import ConfigError
from hpctrain.config.keys import resolve_key
from hpctrain.config.spellings import is_bool_spelling, put, typed_override


def _is_flag(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``[config.toml] [--key value ...]`` into (config path or None, override tokens).

    The config path is the first token before any ``--flag`` (a ``.toml``/``.json`` file, or any path);
    a second positional token before the flags is an error.
    """
    argv = list(argv)
    path = None
    i = 0
    while i < len(argv) and not _is_flag(argv[i]):
        if path is not None:
            raise ConfigError(f"unexpected argument {argv[i]!r}: only one config file may be given "
                              f"(already have {path!r}); options start with '--'")
        path = argv[i]
        i += 1
    return path, argv[i:]


def group_flags(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """[('--key', [values...]), ...] in order; values are the tokens up to the next flag."""
    out: list[tuple[str, list[str]]] = []
    for tok in tokens:
        if _is_flag(tok):
            key, eq, val = tok.partition("=")
            out.append((key, [val] if eq else []))
        elif not out:
            raise ConfigError(f"unexpected value {tok!r} before any --flag")
        else:
            out[-1][1].append(tok)
    return out


def parse_overrides(tokens: list[str]) -> dict[tuple[str, str], Any]:
    """Typed overrides from CLI tokens; a repeated flag: the last one wins. Two different flags that set
    the same key (``--use_flash_attn --attention_backend unfused``) are an error."""
    result: dict[tuple[str, str], Any] = {}
    given: dict[tuple[str, str], str] = {}
    for key, values in group_flags(tokens):
        where = f"command-line flag {key}"
        if not values:
            values = _bare_value(key, where)
        target, value = typed_override(key, values, where, from_cli=True)
        put(result, given, target, value, key, where)
    return result


def _bare_value(key: str, where: str) -> list[str]:
    """A flag given without a value: true for a bool, an empty list for a list, else an error."""
    if is_bool_spelling(key):
        return ["true"]
    sec, name = resolve_key(key, where)
    inner, _ = split_optional(field_type(sec, name))
    if inner is bool:
        return ["true"]
    if typing.get_origin(inner) is list:
        return []
    raise ConfigError(f"{where}: needs a value (e.g. {key} VALUE)")
