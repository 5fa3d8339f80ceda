"""Self-cognition: fill {{NAME}} / {{AUTHOR}} with --model_name / --model_author.

Placeholders match in any case (``{{NAME}}`` as ms-swift's set writes them, ``{{name}}`` as
LLaMA-Factory's identity.json does). Each option takes one value (used for every row) or two,
[zh, en]: rows tagged ``zh`` get the first, all others the second (ms-swift's convention). A row
holding a placeholder while the option is unset is an error that says which flag to pass; a row
that still holds some other ``{{...}}`` after filling is reported by ``leftover_placeholders``
(the pipeline counts them and names them in a warning: the model would learn the braces).
"""
from __future__ import annotations

import re

from .errors import DataError
from .formats import Conversation

PLACEHOLDERS = {"model_name": (re.compile(r"\{\{name\}\}", re.I), "{{NAME}}", "--model_name"),
                "model_author": (re.compile(r"\{\{author\}\}", re.I), "{{AUTHOR}}", "--model_author")}
ANY_PLACEHOLDER = re.compile(r"\{\{[^{}\n]{1,40}\}\}")


def _pick(values: list, tag: str | None) -> str:
    if len(values) == 1:
        return values[0]
    return values[0] if tag == "zh" else values[1]


def _texts(conv: Conversation) -> list[str]:
    return [m["content"] for m in conv.messages] + [conv.system or "", conv.text or ""]


def fill(conv: Conversation, where: str, model_name: list, model_author: list) -> Conversation:
    """Replace the placeholders in every turn (and the system prompt) of `conv`, in place."""
    texts = _texts(conv)
    if not any("{{" in t for t in texts):
        return conv
    values = {"model_name": model_name, "model_author": model_author}
    for key, (pattern, shown, flag) in PLACEHOLDERS.items():
        if not any(pattern.search(t) for t in texts):
            continue
        vals = values[key]
        if not vals or len(vals) > 2:
            raise DataError(f"{where}: self-cognition row holds {shown} but {key} is "
                            f"{'unset' if not vals else vals}; pass {flag} with one value or two (zh en)",
                            "self-cognition placeholder")
        value = _pick(vals, conv.tag)

        def put(text: str, value=value, pattern=pattern) -> str:
            return pattern.sub(lambda _: value, text)  # a function: the value is taken literally

        for m in conv.messages:
            m["content"] = put(m["content"])
        if conv.system:
            conv.system = put(conv.system)
        if conv.text:
            conv.text = put(conv.text)
    return conv


def leftover_placeholders(conv: Conversation) -> list[str]:
    """The ``{{...}}`` placeholders still in `conv` (after ``fill``), in order, without repeats."""
    found = [p for t in _texts(conv) if "{{" in t for p in ANY_PLACEHOLDER.findall(t)]
    return list(dict.fromkeys(found))
