"""The model shape the planner needs, from an HF config.json and/or explicit [model] fields.

Where the shape comes from (first that exists): cfg.model.model (an HF directory holding
config.json, the config.json itself, or a GGUF file), cfg.model.load (converted mcore checkpoints
and training runs keep the HF config.json in their root; a save root means its newest run), read
by the families' ``model_args`` (the one HF-config mapping). Any [model] field that is set
(num_layers, hidden_size, ...) overrides the file, so a plan can be made from explicit fields alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only transformer as megatron-core's GPTModel builds it."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    kv_channels: int
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = False
    add_qkv_bias: bool = False
    disable_bias_linear: bool = True
    qk_layernorm: bool = False
    normalization: str = "RMSNorm"
    num_experts: int = 0          # MoE: experts per MoE layer (0 = dense model)
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_layers: int = 0           # how many of num_layers are MoE layers
    source: str = "explicit fields"

    def layer_mlp_params(self, moe: bool, active: bool = False) -> int:
        """MLP weights of one layer: dense fc1 + fc2, or (MoE) router + all experts / the top-k."""
        if not moe:
            return self.hidden_size * self.ffn_hidden_size * (3 if self.swiglu else 2)
        experts = self.moe_router_topk if active else self.num_experts
        return self.num_experts * self.hidden_size + experts * 3 * self.hidden_size * self.moe_ffn_hidden_size

    def params(self, active: bool = False) -> int:
        """Total (or, for MoE, active-per-token) parameters, embeddings included."""
        h, a, g, d = self.hidden_size, self.num_attention_heads, self.num_query_groups, self.kv_channels
        attn = h * (a + 2 * g) * d + a * d * h
        dense = self.num_layers - self.moe_layers
        body = self.num_layers * attn + dense * self.layer_mlp_params(False) + \
            self.moe_layers * self.layer_mlp_params(True, active)
        return body + self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "kv_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model shape: {name} must be a positive integer, got {value!r} ({self.source})")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model shape: num_attention_heads({self.num_attention_heads}) is not a multiple of "
                             f"num_query_groups({self.num_query_groups}) ({self.source})")


# [model] config field -> ModelShape field, for explicit overrides.
_CFG_KEYS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "padded_vocab_size": "vocab_size", "kv_channels": "kv_channels", "swiglu": "swiglu",
    "untie_embeddings_and_output_weights": "untie_embeddings_and_output_weights",
    "add_qkv_bias": "add_qkv_bias", "disable_bias_linear": "disable_bias_linear",
    "qk_layernorm": "qk_layernorm", "normalization": "normalization",
}
_MOE_KEYS = {"num_experts": "num_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
             "moe_router_topk": "moe_router_topk"}


def _moe_fields(args: dict[str, Any]) -> dict[str, Any]:
    from hpctrain.model.families.base import moe_pattern

    if not args.get("num_experts"):
        return {}
    out = {shape: args[name] for name, shape in _MOE_KEYS.items() if args.get(name)}
    out["moe_layers"] = sum(moe_pattern(args))
    return out


def shape_fields_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """ModelShape fields of an HF config.json dict, through the families' mapping (the same reading
    the converter and the trainer use; an architecture they cannot train is refused here too)."""
    from hpctrain.model.families import model_args

    args = model_args(hf, where)
    return {shape: args[name] for name, shape in _CFG_KEYS.items() if name in args} | {
        "vocab_size": args["vocab_size"]} | _moe_fields(args)


def complete_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Fill derived sizes: query groups = heads (MHA), head dim = hidden / heads, ffn = 4 * hidden."""
    fields = dict(fields)
    if fields.get("num_query_groups") is None:
        fields["num_query_groups"] = fields.get("num_attention_heads")
    if fields.get("kv_channels") is None and fields.get("hidden_size") and fields.get("num_attention_heads"):
        fields["kv_channels"] = fields["hidden_size"] // fields["num_attention_heads"]
    if fields.get("ffn_hidden_size") is None and fields.get("hidden_size"):
        fields["ffn_hidden_size"] = 4 * fields["hidden_size"]
    return fields


def load_shape(model_cfg: Any, moe_cfg: Any = None) -> ModelShape:
    """ModelShape from cfg.model (and cfg.moe): the HF config.json it points at, then explicit field
    overrides."""
    from hpctrain.checkpoint.locate import model_config_path, read_model_config

    fields: dict[str, Any] = {}
    path = model_config_path(getattr(model_cfg, "model", None), getattr(model_cfg, "load", None))
    source = "explicit [model] fields"
    if path is not None:
        fields.update(shape_fields_from_hf(read_model_config(path), str(path)))
        source = str(path)
    for cfg_name, shape_name in _CFG_KEYS.items():
        value = getattr(model_cfg, cfg_name, None)
        if value is not None:
            fields[shape_name] = value
    if moe_cfg is not None and getattr(moe_cfg, "num_experts", None):
        over = {name: getattr(moe_cfg, name) for name in _MOE_KEYS if getattr(moe_cfg, name, None) is not None}
        n = fields.get("num_layers") or getattr(model_cfg, "num_layers", None)
        over["moe_layer_freq"] = getattr(moe_cfg, "moe_layer_freq", None) or 1
        if n:
            fields.update(_moe_fields({**over, "num_layers": n}))
    fields = complete_fields(fields)
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in fields]
    if missing:
        where = f"{path} lacks them" if path else (
            "no config.json found: set [model] model = HF directory, or load = converted mcore checkpoint")
        raise ValueError(f"cannot plan: model shape unknown ({', '.join(missing)}); {where}, "
                         f"or give them as [model] fields (num_layers, hidden_size, num_attention_heads, "
                         f"padded_vocab_size, ...)")
    return ModelShape(source=source, **fields)
