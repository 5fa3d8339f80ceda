"""megatron-core adapter tensors <-> PEFT's adapter format (adapter_model.safetensors + adapter_config.json).

Megatron side: whole (not TP-split) tensors per layer, keyed by the global module name, e.g.
``decoder.layers.3.self_attention.linear_qkv.lora_A`` [r, hidden] and ``...lora_B`` [qkv rows, r] in
megatron's row order. PEFT side: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
and so on. The row split of a fused B is the family's own rule for the fused weight (QKV, GatedMLP
in families/base.py: one reading of the layout); the fused A is every part's A. Reading a PEFT
adapter back needs the parts' A to be equal (what this export writes; an adapter trained by PEFT on
separate q/k/v is refused: its A's differ, megatron's fused linear has one).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from hpctrain.config.errors import ConfigError
from hpctrain.model.families import family_by_name
from hpctrain.model.families.base import Geometry, layer_name
from hpctrain.model.lora.settings import MCORE_TO_HF, SAVE_MODULES, LoraSettings

PREFIX = "base_model.model."
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _rule(fam, key_pattern: str):
    for r in fam.active_rules(False):
        if r.mcore == key_pattern:
            return r
    raise KeyError(f"model family {fam.name} has no parameter {key_pattern}")


def _split(key: str) -> tuple[int | None, str]:
    m = _LAYER_KEY.match(key)
    return (int(m.group(1)), f"decoder.layers.*.{m.group(2)}") if m else (None, key)


def _module(hf_param: str) -> str:
    return hf_param.rsplit(".", 1)[0]


def to_peft(tensors: dict, model_type: str, g: Geometry, adapted: set[str]) -> dict[str, torch.Tensor]:
    """PEFT state dict of whole megatron tensors (adapters, trained biases, modules_to_save);
    ``adapted``: the global megatron names of the linears with adapters (their biases sit under
    PEFT's ``base_layer``)."""
    fam, out = family_by_name(model_type), {}
    for key, t in tensors.items():
        i, pattern = _split(key)
        if pattern.endswith((".lora_A", ".lora_B")):
            linear, which = pattern.rsplit(".", 1)
            rule = _rule(fam, f"{linear}.weight")
            parts = rule.to_hf(t, g) if which == "lora_B" else {n: t.clone() for n in rule.hf_names()}
            for hf, v in parts.items():
                out[f"{PREFIX}{_module(layer_name(hf, i))}.{which}.weight"] = v.contiguous()
            continue
        rule = _rule(fam, pattern)
        lora_base = i is not None and key.rsplit(".", 1)[0] in adapted
        for hf, v in rule.to_hf(t, g).items():
            name = layer_name(hf, i) if i is not None else hf
            if lora_base:
                name = f"{_module(name)}.base_layer.{name.rsplit('.', 1)[1]}"
            out[f"{PREFIX}{name}"] = v.contiguous()
    return out


def from_peft(state: dict, model_type: str, g: Geometry, wanted: list[str], where: str) -> dict:
    """Whole megatron tensors for the megatron keys ``wanted`` from a PEFT state dict (see to_peft)."""
    fam, out = family_by_name(model_type), {}
    for key in wanted:
        i, pattern = _split(key)
        if pattern.endswith((".lora_A", ".lora_B")):
            linear, which = pattern.rsplit(".", 1)
            rule = _rule(fam, f"{linear}.weight")

            def get(hf, which=which, i=i):
                k = f"{PREFIX}{_module(layer_name(hf, i))}.{which}.weight"
                if k not in state:
                    raise ConfigError(f"{where}: no {k}; the adapter does not cover this run's targets "
                                      "(compare its adapter_config.json target_modules with --target_modules)")
                return state[k]
            if which == "lora_B":
                out[key] = rule.to_mcore(get, g)
            else:
                parts = [get(n) for n in rule.hf_names()]
                if any(not torch.equal(parts[0], p) for p in parts[1:]):
                    raise ConfigError(f"{where}: {', '.join(_module(layer_name(n, i)) for n in rule.hf_names())} "
                                      "have different lora_A: megatron-core fuses them into one linear with one A; "
                                      "only adapters trained fused (hpctrain, Megatron-SWIFT) can be loaded")
                out[key] = parts[0]
    return out


def adapter_config(s: LoraSettings, adapted: set[str], base_model: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for what was trained."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    hf = [h for k in kinds for h in MCORE_TO_HF[k]]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s.rank, "lora_alpha": s.alpha,
            "lora_dropout": s.dropout, "target_modules": hf, "bias": s.bias, "use_rslora": s.use_rslora,
            "modules_to_save": [SAVE_MODULES[m][0] for m in s.modules_to_save] or None,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model, "library_name": "hpctrain"}


def write_adapter(out: Path, state: dict, config: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(state dict, adapter_config) of a PEFT LoRA adapter folder; one clear error otherwise."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg_file, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(f"--adapters {path}: not a PEFT adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}, "
                          "as `hpctrain export --to_hf` and peft's save_pretrained write)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are supported")
    return load_file(str(weights)), cfg


def merge_scaling(cfg: dict) -> float:
    r = cfg["r"]
    return cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
