"""One command-line grammar for every ``hpctrain`` command.

    hpctrain COMMAND [ARG ...] [config.toml] [--flag value | --flag=value ...]

* Flags are spelled with underscores or dashes (``--gpus_per_node`` = ``--gpus-per-node``), and a
  command accepts the Megatron-SWIFT / ms-swift spelling where one exists (``reshard --output_dir``
  = ``--out``). A bool flag takes true/false (yes/no, on/off, 1/0) or stands alone for true; a
  list flag takes every value up to the next ``--flag``.
* ``config.toml`` is optional for every command. A command's flag that is also a config key
  (``infer --system`` is ``data.system``) takes its default from the file.
* Training-side commands (sft, pt, prep, plan, submit) take every config key as a flag
  (defaults < config.toml < environment < flags); the others refuse a flag they do not have,
  naming the nearest one. Errors are ConfigError: the dispatcher prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from hpctrain.config import ConfigError, load_config, parse_bool

CONFIG_SUFFIXES = (".toml",)


@dataclass(frozen=True)
class Flag:
    """One flag. ``names[0]`` is the canonical spelling (and the attribute name); the others are aliases."""

    names: tuple[str, ...]
    help: str = ""
    kind: str = "value"            # value | bool | list
    type: Callable[[str], Any] = str
    default: Any = None
    choices: tuple | None = None
    config: str | None = None      # "section.field": the default comes from config.toml when one is given
    required: bool = False

    @property
    def dest(self) -> str:
        return _norm(self.names[0])


def flag(*names: str, **kw) -> Flag:
    return Flag(tuple(names), **kw)


def _norm(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _is_flag(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def _is_bool(token: str) -> bool:
    try:
        parse_bool(token)
    except ValueError:
        return False
    return True


class _Parser(argparse.ArgumentParser):
    """argparse for --help only; its errors become one-line ConfigErrors."""

    def error(self, message: str):
        raise ConfigError(message)


@dataclass(frozen=True)
class Positional:
    name: str
    help: str
    optional: bool = False
    config: str | None = None      # default from config.toml (e.g. reshard's CKPT from model.load)


class CommandLine:
    """The flags, positionals and config handling of one command; ``parse(argv)`` -> argparse.Namespace.

    The namespace has one attribute per flag and positional, plus ``config`` (the config file or
    None), ``cfg`` (its JobConfig, or None), ``given`` (the flags given on the command line) and,
    for all_keys commands, ``overrides`` (the config flags, passed on to load_config). A passthrough
    command keeps every token that is not one of its flags, in order, in ``rest``.
    """

    def __init__(self, prog: str, doc: str, flags: list[Flag], positionals: list[Positional] = (),
                 mode: str | None = None, all_keys: bool = False, passthrough: bool = False, epilog: str = "",
                 on_this_machine: bool = False):
        self.prog, self.doc, self.flags, self.positionals = prog, doc, list(flags), list(positionals)
        self.mode, self.all_keys, self.passthrough, self.epilog = mode, all_keys, passthrough, epilog
        # the command runs the job here (sft, pt): also refuse what this machine cannot run
        self.on_this_machine = on_this_machine
        self._by_name = {_norm(n): f for f in self.flags for n in f.names}

    # --- help ------------------------------------------------------------------------------------
    def help(self) -> str:
        p = _Parser(prog=self.prog, description=self.doc, add_help=False, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=self._epilog())
        for pos in self.positionals:
            p.add_argument(pos.name, nargs="?" if pos.optional or pos.config else None, help=pos.help)
        p.add_argument("config.toml", nargs="?", help="optional job config; its values are the defaults of "
                                                     "the flags marked [config: key]")
        for f in self.flags:
            extra = [f"default {f.default!r}"] if f.default not in (None, False, [], ()) else []
            if f.config:
                extra.append(f"config: {f.config}")
            if f.choices:
                extra.append("choices: " + ", ".join(map(str, f.choices)))
            text = f.help + (f" [{'; '.join(extra)}]" if extra else "")
            meta = {"bool": "[BOOL]", "list": "VALUE ..."}.get(f.kind, f.dest.upper())
            p.add_argument(*[f"--{n.lstrip('-')}" for n in f.names], dest=f.dest, metavar=meta, help=text)
        p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
        return p.format_help()

    def _epilog(self) -> str:
        lines = ["Flags: --key value or --key=value; dashes or underscores (--gpus-per-node = --gpus_per_node)."]
        if self.all_keys:
            from hpctrain.config.load import config_help

            lines += ["Every config key is also a flag:", *config_help(self.mode or "sft").splitlines()[2:]]
        return "\n".join(lines + ([self.epilog] if self.epilog else []))

    # --- parsing ---------------------------------------------------------------------------------
    def parse(self, argv: list[str]) -> argparse.Namespace:
        if any(tok in ("-h", "--help") for tok in argv):
            print(self.help())
            raise SystemExit(0)
        own, overrides, bare = self._split(list(argv))
        ns = argparse.Namespace(**{f.dest: f.default for f in self.flags})
        ns.given = set()
        for f, values in own:
            value = self._convert(f, values)
            if f.kind == "list" and f.dest in ns.given:  # a repeated list flag adds to it (--query a --query b)
                value = getattr(ns, f.dest) + value
            setattr(ns, f.dest, value)
            ns.given.add(f.dest)
        if self.passthrough:  # everything that is not ours goes on, in order, to another command
            ns.rest, overrides, bare = overrides, [], []
        ns.config, positionals = self._positionals(bare)
        ns.overrides, ns.cfg = overrides, None
        if ns.config is not None or self.all_keys:
            # a --mode flag (prep, submit) picks the mode-dependent defaults, as the subcommand does for sft/pt
            mode = ns.mode if "mode" in ns.given else self.mode or "sft"
            ns.cfg = load_config(ns.config, overrides if self.all_keys else [], mode=mode,
                                 on_this_machine=self.on_this_machine)
        self._fill_positionals(ns, positionals)
        self._fill_from_config(ns)
        return ns

    def _fill_positionals(self, ns: argparse.Namespace, values: list[str]) -> None:
        for pos, value in zip(self.positionals, values + [None] * len(self.positionals)):
            if value is None and pos.config and ns.cfg is not None:
                value = _config_value(ns.cfg, pos.config)
            if value is None and not pos.optional:
                raise ConfigError(f"missing {pos.name.upper()}" + (
                    f" (or give it as {pos.config} in config.toml)" if pos.config else ""))
            setattr(ns, pos.name, value)

    def _fill_from_config(self, ns: argparse.Namespace) -> None:
        """Flags not given: the config file's value where the flag is a config key, else the default."""
        for f in self.flags:
            if f.dest in ns.given:
                continue
            value = _config_value(ns.cfg, f.config) if f.config and ns.cfg is not None else None
            if value is not None:
                if f.choices and value not in f.choices:
                    raise ConfigError(f"{f.config} = {value!r} (from {ns.config}) is not one of "
                                      f"{', '.join(map(str, f.choices))} here; pass --{f.dest}")
                setattr(ns, f.dest, value)
            elif f.required:
                raise ConfigError(f"--{f.dest} is required" + (f" (or {f.config} in config.toml)" if f.config else ""))

    def _split(self, argv: list[str]) -> tuple[list[tuple[Flag, list[str]]], list[str], list[str]]:
        """(own flags with their value tokens, config-flag tokens, bare tokens) in order."""
        own: list[tuple[Flag, list[str]]] = []
        overrides: list[str] = []
        bare: list[str] = []
        i = 0
        while i < len(argv):
            tok = argv[i]
            i += 1
            if not _is_flag(tok):
                (overrides if self.passthrough else bare).append(tok)
                continue
            key, eq, val = tok.partition("=")
            f = self._by_name.get(_norm(key))
            if f is None:
                if self.passthrough:
                    overrides.append(tok)
                    continue
                if not self.all_keys:
                    raise ConfigError(self._unknown(key))
                overrides.append(tok)
                while i < len(argv) and not _is_flag(argv[i]) and not eq:
                    overrides.append(argv[i])
                    i += 1
                continue
            values = [val] if eq else []
            if not eq:
                if f.kind == "list":
                    while i < len(argv) and not _is_flag(argv[i]):
                        values.append(argv[i])
                        i += 1
                elif i < len(argv) and not _is_flag(argv[i]) and (f.kind != "bool" or self._bool_value(argv[i])):
                    values.append(argv[i])
                    i += 1
            own.append((f, values))
        return own, overrides, bare

    def _bool_value(self, token: str) -> bool:
        """Whether the bare token after a bool flag is its value: a true/false word; or, for a command
        without positional arguments, anything but a config file (so `--stream maybe` is an error)."""
        if _is_bool(token):
            return True
        return not self.positionals and not self.passthrough and not token.endswith(CONFIG_SUFFIXES)

    def _positionals(self, bare: list[str]) -> tuple[str | None, list[str]]:
        """Pick the config file out of the bare tokens: the one ending in .toml, or (for a command
        without positionals) the only bare token. Too many bare tokens is an error."""
        config = None
        rest = []
        for tok in bare:
            if config is None and (tok.endswith(CONFIG_SUFFIXES) or (not self.positionals and not rest)):
                config = tok
            else:
                rest.append(tok)
        if len(rest) > len(self.positionals):
            extra = rest[len(self.positionals):]
            want = " ".join(p.name.upper() for p in self.positionals) or "no positional arguments"
            raise ConfigError(f"unexpected argument {extra[0]!r} (takes {want} and an optional "
                              f"config.toml; flags start with '--')")
        return config, rest

    def _convert(self, f: Flag, values: list[str]):
        name = f"--{f.names[0].lstrip('-')}"
        if f.kind == "bool":
            try:
                return True if not values else parse_bool(values[0])
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        if f.kind == "list":
            return [_typed(name, f, v) for v in values]
        if not values:
            raise ConfigError(f"{name}: needs a value (e.g. {name} VALUE)")
        return _typed(name, f, values[0])

    def _unknown(self, key: str) -> str:
        names = sorted({f"--{n.lstrip('-')}" for f in self.flags for n in f.names})
        guess = difflib.get_close_matches("--" + _norm(key), names, n=1, cutoff=0.6)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        return f"unknown flag {key}.{hint} Its flags: {', '.join(names) or 'none'} (see --help)"


def _typed(name: str, f: Flag, value: str):
    try:
        out = f.type(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {value!r} is not a valid value ({e})") from None
    if f.choices and out not in f.choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, f.choices))}")
    return out


def _config_value(cfg, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)
