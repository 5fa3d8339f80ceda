"""Self-cognition: fill {{NAME}} / {{AUTHOR}} with --model_name / --model_author.

Each option takes one value (used for every row) or two, [zh, en]: rows tagged ``zh`` get the
first, all others the second (ms-swift's convention). A row holding a placeholder while the
option is unset is an error that says which flag to pass.
"""
from __future__ import annotations

from .errors import DataError
from .formats import Conversation

PLACEHOLDERS = {"{{NAME}}": ("model_name", "--model_name"), "{{AUTHOR}}": ("model_author", "--model_author")}


def _pick(values: list, tag: str | None) -> str:
    if len(values) == 1:
        return values[0]
    return values[0] if tag == "zh" else values[1]


def fill(conv: Conversation, where: str, model_name: list, model_author: list) -> Conversation:
    """Replace the placeholders in every turn (and the system prompt) of `conv`, in place."""
    texts = [m["content"] for m in conv.messages] + [conv.system or "", conv.text or ""]
    if not any("{{" in t for t in texts):
        return conv
    values = {"model_name": model_name, "model_author": model_author}
    for ph, (key, flag) in PLACEHOLDERS.items():
        if not any(ph in t for t in texts):
            continue
        vals = values[key]
        if not vals or len(vals) > 2:
            raise DataError(f"{where}: self-cognition row holds {ph} but {key} is "
                            f"{'unset' if not vals else vals}; pass {flag} with one value or two (zh en)",
                            "self-cognition placeholder")
        value = _pick(vals, conv.tag)
        for m in conv.messages:
            m["content"] = m["content"].replace(ph, value)
        if conv.system:
            conv.system = conv.system.replace(ph, value)
        if conv.text:
            conv.text = conv.text.replace(ph, value)
    return conv
