"""Where each config key is read, found by a static scan of hpctrain/ outside hpctrain/config/ (shared
by test_config_walk.py and the seed-flag matrix in test_config_seed.py).

A key ``section.name`` counts as read when some module reads ``name`` from an object that holds that
section, not from just anything with an attribute of that name (``self.num_workers`` in the loader is
not the config's ``num_workers``). An object holds a section when it is
  * an attribute access ``<anything>.<section>`` (``cfg.data.num_workers``, ``self.cfg.train.lr``);
  * a name bound from one in the same module (``t = cfg.train``; ``d, t = cfg.data, cfg.train``);
  * a name equal to the section (a parameter ``slurm`` or ``data``), or
  * for [data], a DataOptions value named ``opts`` (DataOptions.from_config copies its fields from
    cfg.data by name, so ``opts.lazy_tokenize`` reads data.lazy_tokenize).
Method calls (``model.train()``) are not reads. ``getattr(<section object>, name)`` in a function that
lists the field name as a literal in a tuple/list/set/dict counts (render.py's loop over the Slurm keys).
A key also counts as read where a command's flag declares it (``flag("--output_dir", ...,
config="export.output_dir")`` in a cli_args.CommandLine): the parser fills the flag from that key.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import re
from pathlib import Path

from hpctrain.config.fields import field_choices
from hpctrain.config.refusals import refused_keys, unbuilt_message
from hpctrain.config.sections import SECTIONS
from hpctrain.data.options import DataOptions

PKG = Path(__file__).resolve().parents[2] / "hpctrain"
FIELDS = {s: {f.name for f in dataclasses.fields(c)} for s, c in SECTIONS.items()}
VIEWS = {"opts": ("data", {f.name for f in dataclasses.fields(DataOptions)})}


def _bound_names(tree: ast.AST) -> dict[str, set[str]]:
    bound = {s: {s} for s in SECTIONS}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            pairs = list(zip(target.elts, node.value.elts)) if isinstance(target, ast.Tuple) and \
                isinstance(node.value, ast.Tuple) else [(target, node.value)]
            for t, v in pairs:
                if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr in SECTIONS:
                    bound[v.attr].add(t.id)
    return bound


def _section_of(node: ast.AST, bound: dict[str, set[str]]) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
        return node.attr
    if isinstance(node, ast.Name):
        return next((s for s, names in bound.items() if node.id in names), None)
    return None


def _literals(fn: ast.AST) -> set[str]:
    out: set[str] = set()
    for n in ast.walk(fn):
        elts = n.elts if isinstance(n, (ast.Tuple, ast.List, ast.Set)) else \
            [*n.keys, *n.values] if isinstance(n, ast.Dict) else []
        out |= {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return out


def reads_in(path: Path) -> set[tuple[str, str]]:
    """(section, field) pairs the module at ``path`` reads."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound = _bound_names(tree)
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    reads = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in calls:
            continue
        sec = _section_of(node.value, bound)
        if sec and node.attr in FIELDS[sec]:
            reads.add((sec, node.attr))
        elif isinstance(node.value, ast.Name) and node.value.id in VIEWS:
            sec, names = VIEWS[node.value.id]
            if node.attr in names:
                reads.add((sec, node.attr))
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        lits = _literals(fn)
        for c in ast.walk(fn):
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "getattr" and c.args:
                sec = _section_of(c.args[0], bound)
                if sec:
                    reads |= {(sec, lit) for lit in lits & FIELDS[sec]}
    return reads


@functools.lru_cache(maxsize=None)
def all_reads() -> dict[tuple[str, str], list[str]]:
    """{(section, field): [modules reading it]} over hpctrain/ outside hpctrain/config/."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "config":
            continue
        for key in reads_in(path):
            out.setdefault(key, []).append(str(rel))
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).parts[0] == "config":
            continue
        for sec, name in re.findall(r"\bconfig=[\"'](\w+)\.(\w+)[\"']", path.read_text(encoding="utf-8")):
            if name in FIELDS.get(sec, ()):
                out.setdefault((sec, name), []).append(f"{path.relative_to(PKG)} (a flag filled from it)")
    return out


def field_of(sec: str, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SECTIONS[sec]) if f.name == name)


def verdict(sec: str, name: str) -> str | None:
    """read (by which modules) | refused (with the message) | fixed (one allowed value: the one that runs)
    | None (neither: the key would be accepted and ignored)."""
    if unbuilt_message(sec, name):
        return f"refused: {unbuilt_message(sec, name)}"
    if (sec, name) in all_reads():
        return "read by " + ", ".join(all_reads()[(sec, name)])
    if f"{sec}.{name}" in refused_keys():
        return "refused for " + "; ".join(refused_keys()[f"{sec}.{name}"])
    choices = field_choices(field_of(sec, name))
    if choices and len(choices) == 1:
        return f"fixed: its one choice {choices[0]!r} is what runs"
    return None
