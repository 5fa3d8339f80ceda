"""One user-given key and value -> the (section, field) it sets and its typed value.

Besides the schema's own names (resolved by keys.resolve_key), a few Megatron-LM / Megatron-SWIFT
spellings set a field to a value of their own: ``--use_flash_attn`` is Megatron-LM's way of saying
``attention_backend = "flash"``. Keys of features that are not built are refused here, where the
file line or the flag is still known (refusals.refuse_unbuilt).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from hpctrain.config.coerce import coerce, parse_bool
from hpctrain.config.errors import ConfigError
from hpctrain.config.keys import resolve_key
from hpctrain.config.refusals import refuse_unbuilt


def _flash(on: bool, where: str) -> str:
    if not on:
        raise ConfigError(f"{where}: use_flash_attn = false does not say which attention to use: set "
                          "attention_backend (unfused, local, fused or auto) instead")
    return "flash"


class Spelling(NamedTuple):
    section: str
    field: str
    value: Callable[[bool, str], Any]  # (the bool given, where) -> the field's value
    default: bool                      # the spelling's own default in Megatron-LM
    doc: str


SPELLINGS = {"use_flash_attn": Spelling("train", "attention_backend", _flash, False,
                                        'true sets `train.attention_backend = "flash"`; false is refused '
                                        "(it names no backend)")}


def spelling_of(raw: str) -> str | None:
    """The SPELLINGS entry a raw flag/key names (``--use-flash-attn``, ``train.use_flash_attn``), if any."""
    sec, _, name = raw.strip().lstrip("-").replace("-", "_").rpartition(".")
    return name if name in SPELLINGS and sec in ("", SPELLINGS[name].section) else None


def typed_override(raw: str, value: Any, where: str, from_cli: bool = False) -> tuple[tuple[str, str], Any]:
    """((section, field), typed value) for the user's ``raw`` key set to ``value``."""
    spelling = spelling_of(raw)
    if spelling is not None:
        sp = SPELLINGS[spelling]
        if isinstance(value, list):
            if len(value) != 1:
                raise ConfigError(f"{where}: takes one value (true or false), got {value!r}")
            value = value[0]
        try:
            on = parse_bool(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return (sp.section, sp.field), sp.value(on, where)
    sec, name = resolve_key(raw, where)
    refuse_unbuilt(sec, name, where)
    return (sec, name), coerce(sec, name, value, from_cli=from_cli, where=where)


def put(out: dict, given: dict, target: tuple[str, str], value: Any, raw: str, where: str) -> None:
    """out[target] = value, unless another name in the same source already set that target
    (``use_flash_attn`` and ``attention_backend``, ``--tp`` and ``--tensor_model_parallel_size``): an error.
    The same name again (``--lr`` then ``--train.lr``) is a repeat: the last one wins."""
    name = spelling_of(raw) or raw.strip().lstrip("-").replace("-", "_").split(".")[-1]
    if given.setdefault(target, name) != name:
        raise ConfigError(f"{where}: sets {target[0]}.{target[1]}, which {given[target]} already sets: "
                          "keep one of the two")
    out[target] = value


def is_bool_spelling(raw: str) -> bool:
    """A spelling that takes a bool (so a bare ``--use_flash_attn`` means true)."""
    return spelling_of(raw) is not None
