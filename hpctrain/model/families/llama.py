"""Llama 2 / 3 / 3.1 (LlamaForCausalLM), and Llama-shaped models such as SmolLM2.

No biases; Llama 3.1's "llama3" rope scaling maps to GPTModel(rope_scaling=True,
rope_scaling_factor=factor); megatron-core 0.16.1 hard-codes the other llama3 parameters
(low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192), so other values
are refused rather than silently changed.
"""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families.base import QKV, Direct, Family, GatedMLP, HfConfigError
from hpctrain.model.families.common import decoder_args, flag, rope_scaling

RULES = (
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight", vocab=True, untied_only=True),
    Direct("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
           "model.layers.*.input_layernorm.weight"),
    QKV("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"),
    Direct("decoder.layers.*.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
    Direct("decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
           "model.layers.*.post_attention_layernorm.weight"),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_proj.weight",
             "model.layers.*.mlp.up_proj.weight"),
    Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
)

MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


def config_map(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF config.json -> Megatron model arguments (cfg.model field names)."""
    for key in ("attention_bias", "mlp_bias"):
        if flag(hf, key, where, False):
            raise HfConfigError(f"{where}: {key} = true is not supported (megatron-core's Llama layout "
                                f"has no such bias); only {key} = false models convert")
    args = decoder_args(hf, where)
    args["add_qkv_bias"] = False
    rs = rope_scaling(hf, where)
    if rs:
        key, scaling = rs
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise HfConfigError(f"{where}: {key}.rope_type = {kind!r} is not supported for Llama; "
                                "supported: 'llama3' (Llama 3.1) or none")
        if not isinstance(scaling.get("factor"), int | float) or isinstance(scaling.get("factor"), bool):
            raise HfConfigError(f"{where}: {key}.factor = {scaling.get('factor')!r}: llama3 RoPE scaling "
                                "needs a numeric factor; fix config.json")
        for k, want in MCORE_LLAMA3_FIXED.items():
            if float(scaling.get(k, want)) != want:
                raise HfConfigError(f"{where}: {key}.{k} = {scaling.get(k)} is not supported: "
                                    f"megatron-core 0.16.1 fixes it at {want}")
        args["rope_scaling"] = scaling
    return args


FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",),
                rules=RULES, config_map=config_map)
