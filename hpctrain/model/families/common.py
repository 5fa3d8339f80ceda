"""Typed readers of the HF config.json keys every decoder family here shares (Llama/Qwen2 naming).

Every spelling transformers 4.4x and 5.x write is read here and nowhere else:

* RoPE base: top-level ``rope_theta`` (4.x) or ``rope_parameters.rope_theta`` (5.x);
* RoPE scaling: ``rope_scaling`` (4.x, ``type`` or ``rope_type``) or inside ``rope_parameters`` (5.x);
* dtype: ``torch_dtype`` (4.x) or ``dtype`` (5.x);
* ``head_dim`` (absent or null = hidden_size / num_attention_heads), ``tie_word_embeddings``.

A value that cannot be mapped is refused with an ``HfConfigError`` naming the file and the key.
"""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families.base import HfConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")  # transformers' names
DTYPES = ("float32", "bfloat16", "float16")


def _present(hf: Mapping[str, Any], key: str) -> bool:
    return key in hf and hf[key] is not None


def integer(hf: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    """A positive integer key (``64``; ``64.0`` is accepted, ``64.5`` / ``"two"`` / ``true`` are not)."""
    if not _present(hf, key):
        if default is not None:
            return default
        raise HfConfigError(f"{where}: no {key!r}, which the model shape needs; add it to config.json "
                            "(the model's original config.json has it)")
    v = hf[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise HfConfigError(f"{where}: {key} = {v!r} is not a positive integer; fix it in config.json")
    return v


def number(hf: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """A float key (ints accepted); absent or null gives ``default``."""
    if not _present(hf, key):
        return default
    v = hf[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise HfConfigError(f"{where}: {key} = {v!r} is not a positive number; fix it in config.json")
    return float(v)


def flag(hf: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    if not _present(hf, key):
        return default
    if not isinstance(hf[key], bool):
        raise HfConfigError(f"{where}: {key} = {hf[key]!r} is not true/false; fix it in config.json")
    return hf[key]


def rope_base(hf: Mapping[str, Any], where: str) -> float:
    """The RoPE base: ``rope_theta`` (4.x) or ``rope_parameters.rope_theta`` (5.x); both must agree."""
    rp = hf.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise HfConfigError(f"{where}: rope_parameters = {rp!r} is not an object; fix it in config.json")
    top = number(hf, "rope_theta", where, 0.0) or None
    nested = number(rp, "rope_theta", f"{where}: rope_parameters", 0.0) or None
    if top and nested and top != nested:
        raise HfConfigError(f"{where}: rope_theta = {top:g} and rope_parameters.rope_theta = {nested:g} "
                            "disagree; keep one of them in config.json")
    return top or nested or 10000.0  # transformers' default base when neither is written


def rope_scaling(hf: Mapping[str, Any], where: str) -> tuple[str, dict] | None:
    """(key it was found under, scaling dict without rope_theta) for scaled RoPE, None for plain RoPE.
    An unknown ``rope_type`` is refused, naming the key."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        d = hf.get(key)
        if d is None:
            continue
        if not isinstance(d, dict):
            raise HfConfigError(f"{where}: {key} = {d!r} is not an object; fix it in config.json")
        kind_key = "rope_type" if "rope_type" in d else "type"
        kind = d.get(kind_key)
        if kind is not None and kind not in ROPE_TYPES:
            raise HfConfigError(f"{where}: {key}.{kind_key} = {kind!r} is unknown (transformers knows "
                                f"{', '.join(ROPE_TYPES)}); fix config.json")
        if kind not in (None, "default"):
            found.append((key, {k: v for k, v in d.items() if k != "rope_theta"}))
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise HfConfigError(f"{where}: rope_parameters and rope_scaling give different RoPE scaling; "
                            "keep one of them in config.json")
    return found[0] if found else None


def refuse_qwen_unbuilt(hf: Mapping[str, Any], where: str, family: str) -> None:
    """What no Qwen mapping here builds: sliding-window attention and scaled RoPE (YaRN and others:
    megatron-core has neither per-layer windows nor those scalings here)."""
    if flag(hf, "use_sliding_window", where, False):
        raise HfConfigError(f"{where}: use_sliding_window = true is not supported (megatron-core has no "
                            "per-layer sliding window here); set it to false in config.json")
    rs = rope_scaling(hf, where)
    if rs:
        raise HfConfigError(f"{where}: {rs[0]} asks for {rs[1].get('rope_type', rs[1].get('type'))!r} "
                            f"RoPE scaling, which the {family} mapping does not support (megatron-core has no "
                            "YaRN here); remove the scaling from config.json")


def dtype(hf: Mapping[str, Any], where: str) -> tuple[str | None, str | None]:
    """(dtype name, the key that gave it): ``dtype`` (5.x) or ``torch_dtype`` (4.x); (None, None)
    when config.json names none. An unknown or contradictory dtype is refused."""
    seen = {k: hf[k] for k in ("dtype", "torch_dtype") if _present(hf, k)}
    if len(set(map(str, seen.values()))) > 1:
        raise HfConfigError(f"{where}: dtype = {seen['dtype']!r} and torch_dtype = {seen['torch_dtype']!r} "
                            "disagree; keep one of them in config.json")
    for key, value in seen.items():
        name = str(value).replace("torch.", "")
        if name not in DTYPES:
            raise HfConfigError(f"{where}: {key} = {value!r} cannot be trained (supported: "
                                f"{', '.join(DTYPES)}); pass --torch_dtype to choose one")
        return name, key
    return None, None


def with_dtype(hf: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of ``hf`` whose dtype is ``name`` ("bfloat16", torch.bfloat16), written under the key
    the file already uses (``dtype`` for transformers 5, else ``torch_dtype``)."""
    out = dict(hf)
    out["dtype" if "dtype" in out else "torch_dtype"] = str(name).replace("torch.", "")
    return out


def decoder_args(hf: Mapping[str, Any], where: str, head_dim_default: int | None = None) -> dict[str, Any]:
    """Megatron model arguments (cfg.model names) of a Llama-shaped HF config. ``head_dim_default``:
    the family's head_dim when config.json has none (default: hidden_size / num_attention_heads)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HfConfigError(f"{where}: hidden_act = {act!r}: only 'silu' (SwiGLU) is supported")
    heads = integer(hf, "num_attention_heads", where)
    hidden = integer(hf, "hidden_size", where)
    groups = integer(hf, "num_key_value_heads", where, default=heads)
    if heads % groups:
        raise HfConfigError(f"{where}: num_attention_heads ({heads}) is not a multiple of "
                            f"num_key_value_heads ({groups}); fix config.json")
    if not _present(hf, "head_dim") and head_dim_default is None and hidden % heads:
        raise HfConfigError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                            f"({heads}) and there is no head_dim; add head_dim to config.json")
    return {
        "num_layers": integer(hf, "num_hidden_layers", where),
        "hidden_size": hidden,
        "ffn_hidden_size": integer(hf, "intermediate_size", where),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "group_query_attention": groups != heads,
        "kv_channels": integer(hf, "head_dim", where, default=head_dim_default or hidden // heads),
        "max_position_embeddings": integer(hf, "max_position_embeddings", where, default=4096),
        "position_embedding_type": "rope",
        "rotary_base": rope_base(hf, where),
        "rotary_percent": 1.0,
        "normalization": "RMSNorm",
        "norm_epsilon": number(hf, "rms_norm_eps", where, 1e-6),
        "swiglu": True,
        "disable_bias_linear": True,
        "untie_embeddings_and_output_weights": not flag(hf, "tie_word_embeddings", where, False),
        "vocab_size": integer(hf, "vocab_size", where),
        "rope_scaling": None,
        "qk_layernorm": False,
        "torch_dtype": dtype(hf, where)[0],
    }
