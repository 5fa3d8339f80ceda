"""Typed job configuration: defaults < config file < environment < CLI flags, resolved, validated, dumpable.

    from hpctrain.config import JobConfig, load_config
    cfg = load_config("job.toml", ["--lr", "1e-5"], mode="sft")
    cfg.train.lr, cfg.parallel.tensor_model_parallel_size

See docs/config.md for the syntax and sections.py for every field.
"""
from hpctrain.config.coerce import parse_bool
from hpctrain.config.errors import ConfigError
from hpctrain.config.files import dump_json, dump_toml, read_config, to_toml
from hpctrain.config.flags import split_argv
from hpctrain.config.job import FIELD_SECTION, JobConfig
from hpctrain.config.load import config_from_argv, load_config
from hpctrain.config.resolve import apply_torch_dtype, default_backend, default_transformer_impl, resolve
from hpctrain.config.sections import MODEL_FALLBACKS, SECTIONS
from hpctrain.config.validate import validate

__all__ = [
    "ConfigError", "JobConfig", "parse_bool", "load_config", "config_from_argv", "split_argv", "read_config", "dump_toml",
    "dump_json", "to_toml", "resolve", "validate", "apply_torch_dtype", "default_backend",
    "default_transformer_impl", "FIELD_SECTION", "MODEL_FALLBACKS", "SECTIONS",
]
