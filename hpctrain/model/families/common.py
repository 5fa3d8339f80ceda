"""HF config fields every decoder family here shares (Llama/Qwen2 naming)."""
from __future__ import annotations

from typing import Any, Mapping


def need(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json has no {key!r}, which the conversion needs")
    return hf[key]


def rope_parameters(hf: Mapping[str, Any]) -> dict:
    """transformers >= 5 keeps rope_theta and the scaling in ``rope_parameters``; older configs
    have ``rope_theta`` + ``rope_scaling``. Returns the scaling/theta dict either way."""
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def rope_scaling(hf: Mapping[str, Any]) -> dict | None:
    """The rope scaling dict, or None for plain RoPE."""
    rp = rope_parameters(hf)
    kind = rp.get("rope_type", rp.get("type"))
    return rp if kind not in (None, "default") else None


def decoder_args(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron model arguments (cfg.model names) of a Llama-shaped HF config."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    heads = int(need(hf, "num_attention_heads"))
    hidden = int(need(hf, "hidden_size"))
    groups = int(hf.get("num_key_value_heads") or heads)
    if heads % groups:
        raise ValueError(f"config.json: num_attention_heads ({heads}) is not a multiple of "
                         f"num_key_value_heads ({groups})")
    return {
        "num_layers": int(need(hf, "num_hidden_layers")),
        "hidden_size": hidden,
        "ffn_hidden_size": int(need(hf, "intermediate_size")),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "group_query_attention": groups != heads,
        "kv_channels": int(hf.get("head_dim") or hidden // heads),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "position_embedding_type": "rope",
        "rotary_base": float(hf.get("rope_theta") or rope_parameters(hf).get("rope_theta") or 10000.0),
        "rotary_percent": 1.0,
        "normalization": "RMSNorm",
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "swiglu": True,
        "disable_bias_linear": True,
        "untie_embeddings_and_output_weights": not bool(hf.get("tie_word_embeddings", False)),
        "vocab_size": int(need(hf, "vocab_size")),
        "rope_scaling": None,
        "qk_layernorm": False,
    }
