"""The field helper every config section uses, and the metadata it records.

Each config field carries three facts next to its type and default:
``help`` (one line, shown by ``--help`` style listings and docs), ``choices`` (the allowed values of a
string/enum field, or of each item of a list field) and ``unsupported``: the field exists so
Megatron-SWIFT command lines and configs parse, but the feature is not built, so setting the key at all
(any value, in a file or as a flag) is refused. ``unsupported`` is ``True`` (the section's message in
refusals.SECTION_MESSAGES, or a generic one, is shown) or the message itself: what is not built and
what to use instead.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any


def opt(default: Any, help: str, *, choices: tuple | None = None, unsupported: bool | str = False) -> Any:
    """Declare a config field with its default, one-line help and optional choices.

    Mutable defaults (lists, dicts) become ``default_factory`` so instances never share them.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "unsupported": unsupported}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its factory when it has one)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple | None:
    return f.metadata.get("choices")


def field_unsupported(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("unsupported"))


def field_refusal(f: dataclasses.Field) -> str | None:
    """The field's own refusal message, when ``unsupported`` holds one (not just ``True``)."""
    value = f.metadata.get("unsupported")
    return value if isinstance(value, str) else None
