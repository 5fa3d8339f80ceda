"""Model families as data, and THE one mapping from an HF config to megatron-core model arguments.

``model_args(hf_config, where)`` is the only reading of an HF config.json in hpctrain: conversion
(both directions), the trainer, the precision test, the planner and reshard all call it (directly
or through ``hpctrain.model.build.model_args_from_hf``, which adds the TP-padded vocabulary). It
picks the family from ``architectures`` (else ``model_type``), runs the family's ``config_map``
(every transformers 4.x / 5.x spelling: see ``common.py``) and returns cfg.model field names, plus
``model_type`` (the family) and ``vocab_size`` (config.json's real vocabulary). What it cannot map
raises ``HfConfigError`` (a ``ConfigError``: one line, exit 2) naming the file and the key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from hpctrain.model.families import llama, qwen2, qwen3, qwen3_moe
from hpctrain.model.families.base import MODEL_ARG_KEYS, Family, HfConfigError
from hpctrain.model.families.common import dtype as hf_dtype
from hpctrain.model.families.common import with_dtype

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen2.FAMILY, llama.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY)}

__all__ = ["FAMILIES", "Family", "HfConfigError", "family_by_name", "family_for", "hf_dtype",
           "model_args", "read_config_json", "supported", "with_dtype"]


def supported() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_for(hf_config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of an HF config dict (by ``architectures``, else ``model_type``)."""
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        raise HfConfigError(f"{where}: architectures = {archs!r} is not a list; fix config.json")
    for f in FAMILIES.values():
        if any(a in f.architectures for a in archs):
            return f
    mt = hf_config.get("model_type")
    if not archs:
        for f in FAMILIES.values():
            if mt in f.model_types:
                return f
    raise HfConfigError(f"{where}: unsupported architecture {archs or mt!r}; supported: "
                        f"{', '.join(supported())}")


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise HfConfigError(f"unknown model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def model_args(hf_config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Megatron model arguments (cfg.model names + ``model_type`` + ``vocab_size``) of an HF config."""
    if not isinstance(hf_config, Mapping):
        raise HfConfigError(f"{where}: not a JSON object; an HF config.json is one")
    fam = family_for(hf_config, where)
    args = fam.config_map(hf_config, where)
    missing = [k for k in MODEL_ARG_KEYS if k not in args]
    if missing:  # a family file that forgot a key: a bug here, not the user's
        raise AssertionError(f"family {fam.name}: config_map returned no {', '.join(missing)}")
    args["model_type"] = fam.name
    return args


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict in an HF config.json file; an unreadable or malformed file is one clear error."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HfConfigError(f"{path}: cannot read the model's config.json ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfConfigError(f"{path}: not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(doc, dict):
        raise HfConfigError(f"{path}: holds a JSON {type(doc).__name__}, not an object; an HF "
                            "config.json is one")
    return doc
