"""Model families as data: look one up from an HF config; refuse what is not supported."""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families import llama, qwen2
from hpctrain.model.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen2.FAMILY, llama.FAMILY)}


def supported() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_for(hf_config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of an HF config dict (by ``architectures``, else ``model_type``)."""
    archs = list(hf_config.get("architectures") or [])
    for f in FAMILIES.values():
        if any(a in f.architectures for a in archs):
            return f
    mt = hf_config.get("model_type")
    if not archs:
        for f in FAMILIES.values():
            if mt in f.model_types:
                return f
    raise ValueError(f"{where}: unsupported architecture {archs or mt!r}; supported: "
                     f"{', '.join(supported())}")


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
