"""Key names: flat (``lr``), dotted (``train.lr``) and Megatron-LM dashed (``--tensor-model-parallel-size``)
spellings resolve to one (section, field); unknown names get a closest-match suggestion."""
from __future__ import annotations

import difflib

from hpctrain.config.errors import ConfigError
from hpctrain.config.job import FIELD_SECTION, section_fields
from hpctrain.config.sections import SECTIONS

# Other spellings users bring from Megatron-LM / ms-swift / torchrun, mapped to our field names.
ALIASES = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
    "loss_scale_static": "static_loss_scale",
    "max_steps": "train_iters",
}


def _norm(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def suggest(name: str, candidates: list[str]) -> str | None:
    """The closest candidate to ``name`` (difflib), or None when nothing is close."""
    best = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return best[0] if best else None


def unknown_key_error(name: str, section: str | None, where: str) -> ConfigError:
    """Build the error for an unknown key: the key, the closest valid key and the section's keys."""
    if section is not None and section in SECTIONS:
        keys = list(section_fields(section))
        if name in FIELD_SECTION:
            home = FIELD_SECTION[name]
            return ConfigError(f"{where}: key '{name}' belongs in [{home}], not [{section}]: "
                               f"move it there (or use the flat name --{name}). "
                               f"Valid keys in [{section}]: {', '.join(keys)}")
        guess = suggest(name, keys) or suggest(name, list(FIELD_SECTION))
        hint = ""
        if guess:
            where_guess = section if guess in keys else FIELD_SECTION[guess]
            hint = f" Did you mean '{where_guess}.{guess}'?"
        return ConfigError(f"{where}: unknown key '{section}.{name}'.{hint} "
                           f"Valid keys in [{section}]: {', '.join(keys)}")
    guess = suggest(name, list(FIELD_SECTION) + list(ALIASES))
    if guess:
        guess = ALIASES.get(guess, guess)
        sec = FIELD_SECTION[guess]
        keys = list(section_fields(sec))
        return ConfigError(f"{where}: unknown key '{name}'. Did you mean '{guess}' (in [{sec}])? "
                           f"Valid keys in [{sec}]: {', '.join(keys)}")
    return ConfigError(f"{where}: unknown key '{name}'. Sections: {', '.join(SECTIONS)}; "
                       "see docs/config.md for every key")


def resolve_key(raw: str, where: str) -> tuple[str, str]:
    """Map a flag/key spelling to (section, field) or raise ConfigError with a suggestion."""
    if "." in raw:
        sec, _, name = raw.lstrip("-").partition(".")
        sec, name = _norm(sec), _norm(name)
        if sec not in SECTIONS:
            guess = suggest(sec, list(SECTIONS))
            hint = f" Did you mean '{guess}'?" if guess else ""
            raise ConfigError(f"{where}: unknown section '{sec}' in '{raw}'.{hint} "
                              f"Sections: {', '.join(SECTIONS)}")
        name = ALIASES.get(name, name)
        if name not in section_fields(sec):
            raise unknown_key_error(name, sec, where)
        return sec, name
    name = _norm(raw)
    name = ALIASES.get(name, name)
    if name not in FIELD_SECTION:
        raise unknown_key_error(name, None, where)
    return FIELD_SECTION[name], name
