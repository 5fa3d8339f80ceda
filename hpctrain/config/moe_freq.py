"""``moe.moe_layer_freq``: which layers of a MoE model are MoE layers, read without evaluating anything."""
from __future__ import annotations

import re
from typing import Any

from hpctrain.config.errors import ConfigError

_FREQ_TERM = re.compile(r"^\[\s*([01](?:\s*,\s*[01])*)\s*\](?:\s*\*\s*(\d+))?$")


def parse_moe_layer_freq(value: Any) -> int | list[int]:
    """``moe_layer_freq`` as megatron-core takes it: an int N (layers 0, N, 2N, ... are MoE) or a list
    of 0/1 per layer. Accepts an int, a list, or their text: ``"2"``, ``"[0, 1, 1]"`` and
    Megatron-LM's ``"([0]*3+[1]*29)"`` (parsed, never evaluated)."""
    if isinstance(value, bool):
        raise ConfigError(f"moe.moe_layer_freq = {value!r}: give an int or a list of 0/1 per layer")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"moe.moe_layer_freq = {value}: must be >= 1 (1 = every layer is MoE)")
        return value
    if isinstance(value, list | tuple):
        if not value or any(x not in (0, 1) or isinstance(x, bool) for x in value):
            raise ConfigError(f"moe.moe_layer_freq = {list(value)!r}: a list holds one 0 (dense) or 1 (MoE) per layer")
        return [int(x) for x in value]
    text = str(value).strip()
    if text.isdigit():
        return parse_moe_layer_freq(int(text))
    body = text[1:-1] if text.startswith("(") and text.endswith(")") else text
    out: list[int] = []
    for term in body.split("+"):
        m = _FREQ_TERM.match(term.strip())
        if m is None:
            raise ConfigError(f"moe.moe_layer_freq = {text!r} is not an int, a list of 0/1 or a sum of "
                              "'[0/1,...]*N' terms (e.g. '([0]*1+[1]*47)')")
        out += [int(x) for x in m.group(1).split(",")] * int(m.group(2) or 1)
    return parse_moe_layer_freq(out)
