"""Config files: read TOML/JSON documents into typed overrides (errors name file and line), and write
a JobConfig back out as TOML (a small writer of our own) or JSON (args.json)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from hpctrain.config.errors import ConfigError
from hpctrain.config.fields import field_unsupported
from hpctrain.config.job import FIELD_SECTION, JobConfig
from hpctrain.config.keys import unknown_key_error
from hpctrain.config.sections import SECTIONS
from hpctrain.config.spellings import put, spelling_of, typed_override


def read_document(path: str | os.PathLike) -> tuple[dict, str]:
    """Parse a .toml or .json config file; return (document, text). Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (give a path to a .toml or .json file)")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            line = f":{m.group(1)}" if m else ""
            raise ConfigError(f"{p}{line}: invalid TOML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: the top level must be a table of sections")
    return doc, text


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line number of ``key = ...`` inside ``[section]`` (or at top level)."""
    current = None
    fallback = None
    key_re = re.compile(rf'^\s*"?{re.escape(key)}"?\s*[=:]')
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]", line)
        if m:
            current = m.group(1)
        elif key_re.match(line):
            if current == section:
                return i
            fallback = fallback or i  # JSON has no [section] headers
    return fallback


def _where(path: str, text: str, section: str | None, key: str) -> str:
    line = _line_of(text, section, key)
    shown = f"{section}.{key}" if section else key
    return f"{path}:{line}: key '{shown}'" if line else f"{path}: key '{shown}'"


def document_overrides(doc: dict, path: str, text: str = "") -> dict[tuple[str, str], Any]:
    """Typed {(section, field): value} from a parsed document. Top-level scalars take flat names."""
    out: dict[tuple[str, str], Any] = {}
    given: dict[tuple[str, str], str] = {}
    for top, body in doc.items():
        if isinstance(body, dict) and top in SECTIONS:
            for key, value in body.items():
                where = _where(path, text, top, key)
                target, typed = typed_override(f"{top}.{key}", value, where)
                put(out, given, target, typed, f"{top}.{key}", where)
        elif isinstance(body, dict):
            guess = resolve_section_hint(top)
            raise ConfigError(f"{_where(path, text, None, top)}: unknown section [{top}].{guess} "
                              f"Sections: {', '.join(SECTIONS)}")
        else:
            where = _where(path, text, None, top)
            if top not in FIELD_SECTION and spelling_of(top) is None:
                raise unknown_key_error(top, None, where)
            target, typed = typed_override(top, body, where)
            put(out, given, target, typed, top, where)
    return out


def resolve_section_hint(name: str) -> str:
    import difflib
    best = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.6)
    return f" Did you mean [{best[0]}]?" if best else ""


# ---------------------------------------------------------------- writing

def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def toml_value(v: Any) -> str:
    """One value in TOML syntax (inline tables for dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    if v is None:
        return '"none"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumpable(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of the keys that run: keys of features that are not built (``unsupported``)
    are left out, so args.json never claims e.g. an rlhf_type; a dump reloads without being refused."""
    full = cfg.to_dict()
    return {sec: {f.name: full[sec][f.name] for f in dataclasses.fields(SECTIONS[sec]) if not field_unsupported(f)}
            for sec in SECTIONS}


def to_toml(cfg: JobConfig) -> str:
    """The config as TOML text (the keys of dumpable()); None values equal to a None default are left out."""
    lines = ["# hpctrain resolved config: reload with load_config(path) or hpctrain <cmd> path", ""]
    defaults = JobConfig()
    for sec, values in dumpable(cfg).items():
        lines.append(f"[{sec}]")
        for name, value in values.items():
            if value is None and getattr(getattr(defaults, sec), name) is None:
                continue
            lines.append(f"{name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def dump_toml(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the config as TOML (atomically)."""
    _atomic_write(path, to_toml(cfg))


def dump_json(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the config as JSON {section: {field: value}} (args.json; the keys of dumpable()), atomically."""
    _atomic_write(path, json.dumps(dumpable(cfg), indent=2, ensure_ascii=False) + "\n")


def apply_overrides(cfg: JobConfig, overrides: dict[tuple[str, str], Any]) -> None:
    for (sec, name), value in overrides.items():
        setattr(getattr(cfg, sec), name, value)


def read_config(path: str | os.PathLike) -> JobConfig:
    """Read a dumped config (TOML or JSON) back exactly: no env, no resolve; validated types only."""
    doc, text = read_document(path)
    cfg = JobConfig()
    apply_overrides(cfg, document_overrides(doc, str(path), text))
    return cfg
