"""Which linears of a megatron-core GPT model get LoRA adapters, from ms-swift's [tuner] keys.

megatron-core fuses HF's q_proj/k_proj/v_proj into one ``linear_qkv`` and gate_proj/up_proj into one
``linear_fc1``. An adapter sits on the fused linear: one A shared by the fused parts and one B over
all their output rows (what Megatron-SWIFT does). So q_proj without k_proj and v_proj (or gate_proj
without up_proj) cannot be expressed and is refused; HF names and megatron names are both accepted.
The PEFT export gives q_proj, k_proj and v_proj the same A (and their rows of B): the same model.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from hpctrain.config.errors import ConfigError

# megatron linear -> the HF modules it fuses (in order of its output rows)
MCORE_TO_HF = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
HF_TO_MCORE = {hf: m for m, hfs in MCORE_TO_HF.items() for hf in hfs}
# modules_to_save: megatron name -> (HF module name, dist-checkpoint key of its weight)
SAVE_MODULES = {
    "word_embeddings": ("embed_tokens", "embedding.word_embeddings.weight"),
    "output_layer": ("lm_head", "output_layer.weight"),
}
HF_SAVE = {hf: m for m, (hf, _) in SAVE_MODULES.items()}


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: frozenset = field(default_factory=frozenset)  # megatron linear names
    target_regex: str | None = None                        # matched against global megatron module names
    modules_to_save: tuple = ()                            # megatron names (SAVE_MODULES)
    use_rslora: bool = False
    bias: str = "none"                                     # "all": every bias trains (PEFT bias="all")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def wants(self, name: str) -> bool:
        """``name``: a global megatron module name, e.g. decoder.layers.3.self_attention.linear_qkv."""
        if self.target_regex is not None:
            return re.fullmatch(self.target_regex, name) is not None
        return name.rsplit(".", 1)[-1] in self.targets


def _targets(modules: list[str]) -> frozenset:
    if any(m == "all-linear" for m in modules):
        if len(modules) > 1:
            raise ConfigError(f"tuner.target_modules = {modules}: 'all-linear' already names every linear; "
                              "give it alone or list the modules")
        return frozenset(MCORE_TO_HF)
    out, hf = set(), set()
    for m in modules:
        if m in MCORE_TO_HF:
            out.add(m)
        elif m in HF_TO_MCORE:
            hf.add(m)
        else:
            raise ConfigError(f"tuner.target_modules: unknown module {m!r}; use 'all-linear', HF names "
                              f"({', '.join(HF_TO_MCORE)}) or megatron names ({', '.join(MCORE_TO_HF)})")
    for fused, parts in MCORE_TO_HF.items():
        given = hf & set(parts)
        if given and given != set(parts):
            raise ConfigError(f"tuner.target_modules: {', '.join(sorted(given))} without "
                              f"{', '.join(p for p in parts if p not in given)}: megatron-core fuses "
                              f"{' + '.join(parts)} into one linear ({fused}), and its adapter covers all "
                              f"of them; list all of {', '.join(parts)} (or {fused}), or none")
        if given:
            out.add(fused)
    return frozenset(out)


def _save_modules(names: list[str], tied: bool) -> tuple:
    out = []
    for n in names:
        m = HF_SAVE.get(n, n)
        if m not in SAVE_MODULES:
            raise ConfigError(f"tuner.modules_to_save: {n!r} is not supported; hpctrain trains and saves "
                              "embed_tokens (word_embeddings) and lm_head (output_layer) besides the adapters")
        out.append(m)
    if out and tied:
        raise ConfigError("tuner.modules_to_save with tied embeddings (the output layer is the embedding) is "
                          "not supported: the PEFT copy of one would untie them; remove modules_to_save")
    return tuple(dict.fromkeys(out))


def check_tuner(t) -> None:
    """Config-time checks of the [tuner] keys (the model-dependent ones run in lora_settings)."""
    if t.train_type != "lora":
        from hpctrain.config.fields import field_default

        for f in dataclasses.fields(t):
            if f.name in LORA_KEYS and getattr(t, f.name) != field_default(f):
                raise ConfigError(f"tuner.{f.name} is a LoRA setting, but train_type = {t.train_type!r}: set "
                                  "--train_type lora, or remove it")
        return
    if t.lora_rank < 1:
        raise ConfigError(f"tuner.lora_rank = {t.lora_rank}: must be >= 1")
    if not 0 <= t.lora_dropout < 1:
        raise ConfigError(f"tuner.lora_dropout = {t.lora_dropout}: must be in [0, 1)")
    if t.target_regex is not None:
        try:
            re.compile(t.target_regex)
        except re.error as e:
            raise ConfigError(f"tuner.target_regex = {t.target_regex!r}: not a regular expression ({e})") from None
    else:
        _targets(list(t.target_modules))
    _save_modules(list(t.modules_to_save), tied=False)


LORA_KEYS = ("adapters", "target_modules", "target_regex", "modules_to_save", "lora_rank", "lora_alpha",
             "lora_dropout", "lora_bias", "use_rslora")


def lora_settings(tuner, tied: bool = False) -> LoraSettings | None:
    """The run's LoRA settings (None for full training); ``tied``: embeddings tied to the output layer."""
    if tuner.train_type != "lora":
        return None
    check_tuner(tuner)
    targets = frozenset() if tuner.target_regex is not None else _targets(list(tuner.target_modules))
    return LoraSettings(rank=tuner.lora_rank, alpha=float(tuner.lora_alpha), dropout=tuner.lora_dropout,
                        targets=targets, target_regex=tuner.target_regex,
                        modules_to_save=_save_modules(list(tuner.modules_to_save), tied),
                        use_rslora=tuner.use_rslora, bias=tuner.lora_bias)
