"""Row formats -> one normalized conversation.

Detected per row from its keys (so one file may mix them):

| format          | keys                                                                 |
|-----------------|----------------------------------------------------------------------|
| messages        | ``messages: [{role, content}]`` (OpenAI style, system included)      |
| sharegpt        | ``conversations: [{from, value}]`` (human/gpt/system/...)            |
| alpaca          | ``instruction``, ``output``, optional ``input``, ``system``, ``history`` |
| query/response  | ``query``, ``response``, optional ``history``, ``system``            |
| text            | ``text`` (pre-training only)                                         |

The normalized form is :class:`Conversation`: an optional system prompt and a list of
``{"role", "content"}`` turns (user / assistant / tool). A row that fits none of the formats, a
non-string content or an empty assistant turn is a :class:`DataError` naming where it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
FORMAT_KEYS = "messages | conversations | instruction+output (alpaca) | query+response | text"


@dataclass
class Conversation:
    messages: list = field(default_factory=list)
    """[{"role": "user"|"assistant"|"tool", "content": str}], no system turn."""
    system: str | None = None
    tag: str | None = None
    text: str | None = None
    """Plain text (the 'text' format, pre-training)."""


def _str(value, where: str, what: str, allow_empty: bool = True) -> str:
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {type(value).__name__}, expected a string", "non-string content")
    return value


def _history(row: dict, where: str) -> list:
    hist = row.get("history") or []
    if not isinstance(hist, list):
        raise DataError(f"{where}: 'history' must be a list of [query, response] pairs", "bad history")
    out = []
    for j, pair in enumerate(hist):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{where}: history[{j}] must be a [query, response] pair", "bad history")
        out.append({"role": "user", "content": _str(pair[0], where, f"history[{j}][0]")})
        out.append({"role": "assistant", "content": _str(pair[1], where, f"history[{j}][1]")})
    return out


def _from_turns(turns, where: str, key: str, role_key: str, content_key: str, roles: dict) -> Conversation:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns", "bad turns")
    system, messages = None, []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or role_key not in t or content_key not in t:
            keys = sorted(t) if isinstance(t, dict) else type(t).__name__
            raise DataError(f"{where}: {key}[{j}] needs '{role_key}' and '{content_key}' (found {keys})",
                            "bad turns")
        role = roles.get(t[role_key]) if isinstance(t[role_key], str) else None
        if role is None:
            raise DataError(f"{where}: {key}[{j}].{role_key}={t[role_key]!r} is not one of "
                            f"{sorted(roles)}", "bad role")
        content = _str(t[content_key], where, f"{key}[{j}].{content_key}", allow_empty=False)
        if role == "system":
            if j != 0:
                raise DataError(f"{where}: a system turn is only allowed first ({key}[{j}])", "bad turns")
            system = content
        else:
            messages.append({"role": role, "content": content})
    return Conversation(messages=messages, system=system)


def _alpaca(row: dict, where: str) -> Conversation:
    instruction = _str(row.get("instruction"), where, "'instruction'")
    extra = _str(row.get("input"), where, "'input'")
    query = f"{instruction}\n{extra}" if instruction and extra else (instruction or extra)
    messages = _history(row, where)
    messages += [{"role": "user", "content": query},
                 {"role": "assistant", "content": _str(row.get("output"), where, "'output'")}]
    return Conversation(messages=messages, system=_system(row, where))


def _query_response(row: dict, where: str) -> Conversation:
    messages = _history(row, where)
    messages += [{"role": "user", "content": _str(row.get("query"), where, "'query'")},
                 {"role": "assistant", "content": _str(row.get("response"), where, "'response'")}]
    return Conversation(messages=messages, system=_system(row, where))


def _system(row: dict, where: str) -> str | None:
    s = row.get("system")
    return None if s is None else _str(s, where, "'system'")


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "query" in row and "response" in row:
        return "query_response"
    if "text" in row:
        return "text"
    return None


def normalize(row: dict, where: str, mode: str = "sft") -> Conversation:
    """The row as a Conversation, validated for `mode` ('sft' needs an assistant turn)."""
    fmt = detect_format(row)
    if fmt is None:
        raise DataError(f"{where}: unknown row format; found keys {sorted(row)}, expected one of "
                        f"{FORMAT_KEYS}", "unknown format")
    if fmt == "messages":
        conv = _from_turns(row["messages"], where, "messages", "role", "content",
                           {r: r for r in MESSAGE_ROLES})
        if conv.system is None:
            conv.system = _system(row, where)
    elif fmt == "sharegpt":
        conv = _from_turns(row["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
        if conv.system is None:
            conv.system = _system(row, where)
    elif fmt == "alpaca":
        conv = _alpaca(row, where)
    elif fmt == "query_response":
        conv = _query_response(row, where)
    else:
        text = _str(row["text"], where, "'text'", allow_empty=False)
        if mode != "pt":
            raise DataError(f"{where}: a 'text' row has no assistant turn to train on in sft mode; "
                            "use `hpctrain pt` or a conversation format", "text row in sft")
        return Conversation(text=text, tag=row.get("tag"))
    conv.tag = row.get("tag") if isinstance(row.get("tag"), str) else None
    _validate(conv, where)
    return conv


def _validate(conv: Conversation, where: str) -> None:
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise DataError(f"{where}: the conversation has no assistant turn", "no assistant turn")
    for j, m in enumerate(conv.messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: assistant turn {j} is empty; remove the row or fill the answer",
                            "empty assistant turn")
    if conv.messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant turn (no prompt)", "bad turns")
