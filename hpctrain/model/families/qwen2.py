"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): GQA, bias on q/k/v only, tied or untied embeddings."""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families.base import QKV, Direct, Family, GatedMLP
from hpctrain.model.families.common import decoder_args, refuse_qwen_unbuilt

RULES = (
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight", vocab=True, untied_only=True),
    Direct("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
           "model.layers.*.input_layernorm.weight"),
    QKV("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"),
    QKV("decoder.layers.*.self_attention.linear_qkv.bias", "model.layers.*.self_attn.q_proj.bias",
        "model.layers.*.self_attn.k_proj.bias", "model.layers.*.self_attn.v_proj.bias"),
    Direct("decoder.layers.*.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
    Direct("decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
           "model.layers.*.post_attention_layernorm.weight"),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_proj.weight",
             "model.layers.*.mlp.up_proj.weight"),
    Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
)


def config_map(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF config.json -> Megatron model arguments (cfg.model field names)."""
    refuse_qwen_unbuilt(hf, where, "Qwen2")
    args = decoder_args(hf, where)
    args["add_qkv_bias"] = True  # Qwen2 always has q/k/v biases (config.json has no key for it)
    return args


FAMILY = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",),
                rules=RULES, config_map=config_map)
