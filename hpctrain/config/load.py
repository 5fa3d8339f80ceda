"""load_config: defaults < config file (TOML/JSON) < environment (NPROC_PER_NODE, ...) < CLI flags,
then resolve() derived defaults, then validate() (and, where the trainer starts, machine checks)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from hpctrain.config.errors import ConfigError
from hpctrain.config.files import apply_overrides, document_overrides, read_document
from hpctrain.config.flags import parse_overrides, split_argv
from hpctrain.config.job import JobConfig, section_fields
from hpctrain.config.machine import check_machine
from hpctrain.config.resolve import env_overrides, resolve
from hpctrain.config.sections import SECTIONS
from hpctrain.config.validate import validate

MODES = ("sft", "pt", "export", "infer", "plan", "submit", "prep", "reshard")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), mode: str = "sft",
                environ: Mapping[str, str] | None = None, on_this_machine: bool = False) -> JobConfig:
    """Build the validated JobConfig for one command.

    path: a .toml (or .json, e.g. a dumped args.json) config file, or None.
    overrides: CLI tokens such as ``["--lr", "1e-5", "--dataset", "a#500", "b"]``.
    mode: the subcommand; train.mode is set to it for sft/pt (a train.mode set to the other one is refused).
    environ: where NPROC_PER_NODE / CUDA_VISIBLE_DEVICES / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT
        are read from (default os.environ).
    on_this_machine: the trainer starts here: also refuse what this machine and launch cannot run
        (machine.py: Transformer Engine / apex / CUDA presence, TP x PP x CP against the world size).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choices: {', '.join(MODES)}")
    environ = dict(os.environ if environ is None else environ)
    cfg = JobConfig()
    layers = []
    if path is not None:
        doc, text = read_document(path)
        layers.append(document_overrides(doc, str(path), text))
    layers.append(env_overrides(environ))
    layers.append(parse_overrides(list(overrides)))
    for layer in layers:
        apply_overrides(cfg, layer)
    if mode in ("sft", "pt"):
        if cfg.train.mode != mode and any(("train", "mode") in layer for layer in layers):
            raise ConfigError(f"train.mode = {cfg.train.mode!r} but the command is `hpctrain {mode}`: the "
                              f"subcommand sets the mode; run `hpctrain {cfg.train.mode}` or remove train.mode")
        cfg.train.mode = mode
    resolve(cfg)
    validate(cfg, mode)
    if on_this_machine:
        check_machine(cfg, environ)
    return cfg


def config_from_argv(argv: Sequence[str], mode: str = "sft", environ: Mapping[str, str] | None = None,
                     on_this_machine: bool = False) -> JobConfig:
    """For a subcommand's ``run(argv)``: ``[config.toml] [--key value ...]`` -> JobConfig.

    Strip your command's own flags (e.g. ``--dry-run``) from argv before calling this.
    ``-h`` / ``--help`` prints the config syntax and every key, then exits 0 (like argparse).
    """
    if any(tok in ("-h", "--help") for tok in argv):
        print(config_help(mode))
        raise SystemExit(0)
    path, tokens = split_argv(list(argv))
    return load_config(path, tokens, mode=mode, environ=environ, on_this_machine=on_this_machine)


def config_help(mode: str = "sft") -> str:
    """Usage text for a config-taking command: syntax, precedence and the keys of every section."""
    lines = [f"usage: hpctrain {mode} [config.toml] [--key value ...]", "",
             "Sources: defaults < config.toml < env (NPROC_PER_NODE, CUDA_VISIBLE_DEVICES, ...) < --flags.",
             "Flags: --lr 1e-5 | --train.lr 1e-5 | --tensor-model-parallel-size 2 | --finetune true | --finetune",
             "       --dataset 'a.jsonl#500' 'b.jsonl' (lists) | --env A=1 B=2 (dicts) | --key none (unset)",
             "Types, defaults and meanings of every key: docs/config.md (python -m hpctrain.config.reference).", ""]
    for sec in SECTIONS:
        lines.append(f"[{sec}] " + ", ".join(section_fields(sec)))
    return "\n".join(lines)
