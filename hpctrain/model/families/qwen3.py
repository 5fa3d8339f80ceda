"""Qwen3 dense (Qwen3ForCausalLM): GQA, per-head q/k RMSNorm, head_dim independent of hidden/heads,
no biases, tied (0.6B-4B) or untied (8B+) embeddings.

HF normalises each head's query and key (``self_attn.q_norm`` / ``k_norm``, one weight of size
head_dim shared by all heads) after the projection and before RoPE; megatron-core's SelfAttention
does the same with ``qk_layernorm`` (``q_layernorm`` / ``k_layernorm``, eps = the layer norm's).
"""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families.base import QKV, Direct, Family, GatedMLP, HfConfigError
from hpctrain.model.families.common import decoder_args, flag, refuse_qwen_unbuilt

ATTENTION = (
    Direct("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
           "model.layers.*.input_layernorm.weight"),
    QKV("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"),
    Direct("decoder.layers.*.self_attention.q_layernorm.weight", "model.layers.*.self_attn.q_norm.weight"),
    Direct("decoder.layers.*.self_attention.k_layernorm.weight", "model.layers.*.self_attn.k_norm.weight"),
    Direct("decoder.layers.*.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
)
EMBEDDINGS = (
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight", vocab=True, untied_only=True),
)
DENSE_MLP = (
    Direct("decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
           "model.layers.*.post_attention_layernorm.weight"),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_proj.weight",
             "model.layers.*.mlp.up_proj.weight"),
    Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
)
RULES = EMBEDDINGS + ATTENTION + DENSE_MLP

HEAD_DIM_DEFAULT = 128  # transformers' Qwen3Config / Qwen3MoeConfig default when config.json has none


def qwen3_args(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The attention part every Qwen3 (dense or MoE) shares; refuses what megatron-core lacks."""
    if flag(hf, "attention_bias", where, False):
        raise HfConfigError(f"{where}: attention_bias = true is not supported (megatron-core has no bias on "
                            "the output projection next to add_qkv_bias); only attention_bias = false converts")
    refuse_qwen_unbuilt(hf, where, "Qwen3")
    args = decoder_args(hf, where, head_dim_default=HEAD_DIM_DEFAULT)
    args["add_qkv_bias"] = False
    args["qk_layernorm"] = True
    return args


def config_map(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF config.json -> Megatron model arguments (cfg.model field names)."""
    return qwen3_args(hf, where)


FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), model_types=("qwen3",),
                rules=RULES, config_map=config_map)
