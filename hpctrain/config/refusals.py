"""What hpctrain refuses, and the message it gives: one table per kind of refusal.

1. Keys of features that are not built (``unsupported`` on the field, see fields.py): refused as soon
   as the key is set, whatever its value (``--rlhf_type dpo`` is refused although "dpo" is the
   default), in a config file or as a flag. They are also left out of dumped configs (args.json,
   config.toml), so a dump never claims a setting that did not run.
2. Values a built key cannot take here (VALUE_REFUSALS): e.g. ``ckpt_format = "zarr"``.

Every message says what is not built and what to use instead. Contradictions between keys and the
checks that depend on the machine live in validate.py and machine.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hpctrain.config.errors import ConfigError
from hpctrain.config.fields import field_refusal, field_unsupported
from hpctrain.config.sections import SECTIONS

# The message for a section's `unsupported=True` fields (MoE, LoRA and DPO keys are wired section by section).
SECTION_MESSAGES = {
    "tuner": "freezing parameters by name is not built: train all parameters (train_type full) or "
             "adapters (train_type lora, docs/lora.md); remove the key",
    "rlhf": "[rlhf] is not built: hpctrain trains sft and pt only (no DPO, no reference model); "
            "remove the [rlhf] keys and train with `hpctrain sft`",
}
GENERIC = "not built in this version of hpctrain; remove the key"


def unbuilt_message(section: str, name: str) -> str | None:
    """Why ``section.name`` is refused whatever its value, or None when the key is built."""
    f = _field(section, name)
    if not field_unsupported(f):
        return None
    return field_refusal(f) or SECTION_MESSAGES.get(section, GENERIC)


def refuse_unbuilt(section: str, name: str, where: str) -> None:
    """Raise for a key of a feature that is not built (called when the user sets it)."""
    msg = unbuilt_message(section, name)
    if msg is not None:
        raise ConfigError(f"{where}: {section}.{name} is not supported yet: {msg}")


def _field(section: str, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


# (section.key, the refused value, message). Checked by validate() on the resolved config.
VALUE_REFUSALS: list[tuple[str, Any, str]] = [
    ("checkpoint.ckpt_format", "zarr",
     "zarr checkpoints are deprecated in megatron-core and not written by hpctrain: use torch_dist "
     "(or torch for Megatron-LM's legacy per-rank files)"),
    ("model.position_embedding_type", "relative",
     "megatron-core's GPTModel has no relative position embedding (it would train without any): use rope "
     "(what the HF families use), learned_absolute or none"),
    ("model.position_embedding_type", "mrope",
     "multimodal RoPE (mrope) is not built: hpctrain trains text models; use rope"),
    ("train.dataloader_type", "external",
     "external dataloaders are for streaming datasets, which are not built: use cyclic (reshuffled every "
     "epoch) or single (dataset order)"),
    ("train.calculate_per_token_loss", False,
     "averaging the loss per micro-batch is not built: hpctrain always divides the summed loss by the trained "
     "tokens of the whole global batch; remove calculate_per_token_loss = false"),
    ("train.no_masked_softmax_fusion", True,
     "no attention here uses megatron's fused masked softmax (the portable attention runs scale, mask and "
     "softmax inside SDPA/flex kernels, Transformer Engine in its own): to run attention with explicit masks "
     "set attention_backend = unfused"),
    ("parallel.tp_comm_overlap", True,
     "overlapping TP communication needs Transformer Engine userbuffers, which hpctrain does not set up: "
     "set tp_comm_overlap = false"),
    ("precision.apply_query_key_layer_scaling", True,
     "no attention here applies it (the portable attention's SDPA kernels accumulate QK^T in fp32 and take "
     "no per-layer scale; Transformer Engine needs NVTE_APPLY_QK_LAYER_SCALING): set it false"),
    ("moe.moe_token_dispatcher_type", "flex",
     "the flex dispatcher needs DeepEP or Transformer Engine's fused a2a: use alltoall (or allgather)"),
    ("moe.moe_token_dispatcher_type", "alltoall_seq",
     "alltoall_seq was removed from megatron-core (0.13+): use alltoall"),
    ("moe.moe_router_load_balancing_type", "seq_aux_loss",
     "the per-sequence aux loss is not built (Qwen3-MoE trains with the Switch-style aux loss): use aux_loss or none"),
    ("moe.moe_router_load_balancing_type", "sinkhorn",
     "Sinkhorn routing is not built (Qwen3-MoE routes by softmax top-k): use aux_loss or none"),
    ("precision.attention_softmax_in_fp32", False,
     "the attention kernels (SDPA, flex_attention, Transformer Engine) compute the softmax in fp32 whatever "
     "this says: remove attention_softmax_in_fp32 = false"),
]


def check_value_refusals(cfg) -> None:
    """Raise for the first key holding a value hpctrain refuses (VALUE_REFUSALS)."""
    for key, refused, message in VALUE_REFUSALS:
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if type(value) is type(refused) and value == refused:
            raise ConfigError(f"config key '{key}' = {_toml(value)} is not supported: {message}")


def refused_keys() -> dict[str, list[str]]:
    """{section.key: [messages]} of every refusal above (for the docs and the schema walk); a refused
    value is named in front of its message."""
    out: dict[str, list[str]] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            msg = unbuilt_message(sec, f.name)
            if msg:
                out.setdefault(f"{sec}.{f.name}", []).append(msg)
    for key, value, message in VALUE_REFUSALS:
        out.setdefault(key, []).append(f"= {_toml(value)}: {message}")
    return out


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)
