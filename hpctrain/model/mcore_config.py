"""Megatron model arguments (cfg.model names, from a family's config map) -> megatron-core configs.

``model_args`` is a plain dict with the cfg.model field names (num_layers, hidden_size, ...) plus
``vocab_size`` (the real vocabulary) and ``padded_vocab_size``. The checkpoint-independent part of
what GPTModel needs lives here; the parallel sizes come from the caller.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from hpctrain.config.errors import ConfigError
from hpctrain.config.moe_freq import parse_moe_layer_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab(vocab_size: int, tp: int = 1) -> int:
    """Embedding rows for ``vocab_size`` at tensor parallel size ``tp``: the vocabulary itself when
    TP divides it (as Megatron-SWIFT does), else the next multiple of TP. Megatron-LM's habit of
    padding to a multiple of 128 * TP is not followed: padding rows take part in the softmax, so
    the model's loss would no longer be the HF model's (real vocabularies are multiples of 128 or
    at least of the usual TP sizes already)."""
    return int(math.ceil(vocab_size / tp) * tp)


def check_tp(args: Mapping[str, Any], tp: int) -> None:
    """TP must divide heads, query groups, ffn and the padded vocabulary; say which does not."""
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size"):
        n = args.get(key)
        if n is not None and n % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide {key}={n}; "
                             f"pick a TP that divides {key}")


def check_pp(args: Mapping[str, Any], pp: int) -> None:
    if args["num_layers"] % pp:
        raise ValueError(f"pipeline_model_parallel_size={pp} does not divide num_layers="
                         f"{args['num_layers']}; pick a PP that divides it")


def transformer_config(args: Mapping[str, Any], *, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                       ep: int = 1, etp: int | None = None, **overrides: Any):
    """A megatron-core TransformerConfig for ``args``; ``overrides`` win (any TransformerConfig field)."""
    from megatron.core.transformer import TransformerConfig

    check_tp(args, tp)
    check_pp(args, pp)
    check_ep(args, ep)
    kw: dict[str, Any] = dict(
        num_layers=args["num_layers"], hidden_size=args["hidden_size"],
        ffn_hidden_size=args["ffn_hidden_size"], num_attention_heads=args["num_attention_heads"],
        num_query_groups=args["num_query_groups"], kv_channels=args["kv_channels"],
        layernorm_epsilon=args["norm_epsilon"], normalization=args.get("normalization", "RMSNorm"),
        gated_linear_unit=bool(args.get("swiglu", True)), activation_func=torch.nn.functional.silu,
        add_bias_linear=not args.get("disable_bias_linear", True),
        add_qkv_bias=bool(args.get("add_qkv_bias", False)),
        qk_layernorm=bool(args.get("qk_layernorm", False)),
        hidden_dropout=float(args.get("hidden_dropout") or 0.0),
        attention_dropout=float(args.get("attention_dropout") or 0.0),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype, use_cpu_initialization=True,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, bias_activation_fusion=False,
    )
    kw.update(moe_kwargs(args, ep, etp))
    kw.update(overrides)
    return TransformerConfig(**kw)


def moe_kwargs(args: Mapping[str, Any], ep: int = 1, etp: int | None = None) -> dict[str, Any]:
    """TransformerConfig MoE fields of model arguments holding ``num_experts`` (empty for a dense
    model). The router is Qwen3-MoE's / Megatron's default: softmax scores, top-k, aux loss."""
    if not args.get("num_experts"):
        return {}
    return dict(
        num_moe_experts=int(args["num_experts"]), moe_ffn_hidden_size=int(args["moe_ffn_hidden_size"]),
        moe_router_topk=int(args["moe_router_topk"]),
        moe_router_pre_softmax=bool(args.get("moe_router_pre_softmax", False)),
        moe_layer_freq=parse_moe_layer_freq(args.get("moe_layer_freq", 1)),
        moe_aux_loss_coeff=float(args.get("moe_aux_loss_coeff") or 0.0),
        moe_router_load_balancing_type="aux_loss", moe_router_dtype="fp32",
        moe_router_score_function="softmax", moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
    )


def check_ep(args: Mapping[str, Any], ep: int) -> None:
    n = args.get("num_experts")
    if ep > 1 and not n:
        raise ValueError(f"expert_model_parallel_size={ep} needs a MoE model (this one has no experts); use 1")
    if n and n % ep:
        raise ValueError(f"expert_model_parallel_size={ep} does not divide num_experts={n}; "
                         "pick an EP that divides it")


def rope_scaling_factor(rs: Mapping[str, Any] | None) -> float | None:
    """The llama3 scaling factor of a rope_scaling dict (None: plain RoPE). megatron-core's GPTModel
    only has Llama 3.1's scaling (``rope_scaling=True`` + factor); anything else is refused."""
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind != "llama3":
        raise ConfigError(f"model.rope_scaling type {kind!r} is not supported by megatron-core's GPTModel "
                          "(supported: llama3, or none)")
    return float(rs.get("factor", 8.0))


def gpt_model_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """GPTModel keyword arguments besides config/spec/pre/post_process."""
    factor = rope_scaling_factor(args.get("rope_scaling"))
    return dict(
        vocab_size=int(args["padded_vocab_size"]),
        max_sequence_length=int(args["max_position_embeddings"]),
        position_embedding_type=args.get("position_embedding_type", "rope"),
        rotary_percent=float(args.get("rotary_percent", 1.0)),
        rotary_base=float(args.get("rotary_base", 10000.0)),
        share_embeddings_and_output_weights=not args["untie_embeddings_and_output_weights"],
        rope_scaling=factor is not None,
        rope_scaling_factor=factor or 8.0,
    )
