"""What a model family is: an HF config -> megatron-core config map and an HF <-> mcore parameter map.

Parameter names on the megatron side are megatron-core's dist-checkpoint keys (the names every
layer spec saves under, TE or local: a layer's norms live at ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``). ``*`` stands for the layer number; on disk the layers of one
name are stacked along a leading axis of size ``num_layers`` (megatron-core's layout).

Rules (megatron-core 0.16.1 layouts, see ``Attention.get_query_key_value_tensors`` and
``MLP.sharded_state_dict``):
* ``Direct``: same tensor on both sides (``vocab=True``: rows padded to the padded vocabulary).
* ``QKV``: linear_qkv rows are, for each query group g, [q heads of g; k_g; v_g].
* ``GatedMLP``: linear_fc1 is [gate; up] globally; TP rank r holds [gate_r; up_r], which
  megatron-core's swiglu sharded factory maps back to the global [gate; up] on save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from hpctrain.config.errors import ConfigError
from hpctrain.native import relayout


class HfConfigError(ConfigError):
    """An HF config.json value the mapping cannot turn into megatron-core arguments. The message
    names the file and the key, and says what to change (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class Geometry:
    """Shapes the rules need (from the HF config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool


@dataclass(frozen=True)
class Direct:
    mcore: str
    hf: str
    vocab: bool = False
    untied_only: bool = False

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_mcore(self, get: Callable[[str], torch.Tensor], g: Geometry) -> torch.Tensor:
        t = get(self.hf)
        if self.vocab and g.padded_vocab_size != t.shape[0]:
            out = torch.zeros((g.padded_vocab_size,) + tuple(t.shape[1:]), dtype=t.dtype)
            out[: t.shape[0]] = t
            return out
        return t

    def to_hf(self, t: torch.Tensor, g: Geometry) -> dict[str, torch.Tensor]:
        return {self.hf: t[: g.vocab_size] if self.vocab else t}

    def mcore_shape(self, hf_shapes: Mapping[str, tuple], g: Geometry) -> tuple:
        s = tuple(hf_shapes[self.hf])
        return (g.padded_vocab_size,) + s[1:] if self.vocab else s


@dataclass(frozen=True)
class QKV:
    mcore: str
    q: str
    k: str
    v: str
    untied_only: bool = False

    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def to_mcore(self, get, g: Geometry) -> torch.Tensor:
        q, k, v = get(self.q), get(self.k), get(self.v)
        hpg = g.num_heads // g.num_query_groups
        out = torch.empty((q.shape[0] + k.shape[0] + v.shape[0],) + tuple(q.shape[1:]), dtype=q.dtype)
        relayout.qkv_to_mcore(q.contiguous(), k.contiguous(), v.contiguous(), g.num_query_groups,
                              hpg, g.head_dim, out=out)
        return out

    def to_hf(self, t: torch.Tensor, g: Geometry) -> dict[str, torch.Tensor]:
        hpg = g.num_heads // g.num_query_groups
        rest = tuple(t.shape[1:])
        q = torch.empty((g.num_heads * g.head_dim,) + rest, dtype=t.dtype)
        k = torch.empty((g.num_query_groups * g.head_dim,) + rest, dtype=t.dtype)
        v = torch.empty_like(k)
        relayout.qkv_from_mcore(t.contiguous(), g.num_query_groups, hpg, g.head_dim, 1, 0, q, k, v)
        return {self.q: q, self.k: k, self.v: v}

    def mcore_shape(self, hf_shapes, g: Geometry) -> tuple:
        q, k, v = (tuple(hf_shapes[n]) for n in self.hf_names())
        return (q[0] + k[0] + v[0],) + q[1:]


@dataclass(frozen=True)
class GatedMLP:
    mcore: str
    gate: str
    up: str
    untied_only: bool = False

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def to_mcore(self, get, g: Geometry) -> torch.Tensor:
        gate, up = get(self.gate), get(self.up)
        out = torch.empty((2 * gate.shape[0],) + tuple(gate.shape[1:]), dtype=gate.dtype)
        relayout.gated_mlp_to_mcore(gate.contiguous(), up.contiguous(), out=out)
        return out

    def to_hf(self, t: torch.Tensor, g: Geometry) -> dict[str, torch.Tensor]:
        n = t.shape[0] // 2
        gate = torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype)
        up = torch.empty_like(gate)
        relayout.gated_mlp_from_mcore(t.contiguous(), 1, 0, gate, up)
        return {self.gate: gate, self.up: up}

    def mcore_shape(self, hf_shapes, g: Geometry) -> tuple:
        s = tuple(hf_shapes[self.gate])
        return (2 * s[0],) + s[1:]


Rule = Direct | QKV | GatedMLP


# What every Family.config_map returns: cfg.model field names (the trainer fills the fields the user
# left unset from them) plus ``vocab_size`` (config.json's real vocabulary, before TP padding).
MODEL_ARG_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "rotary_base", "rotary_percent", "normalization", "norm_epsilon", "swiglu", "disable_bias_linear",
    "add_qkv_bias", "untie_embeddings_and_output_weights", "qk_layernorm", "rope_scaling",
    "torch_dtype", "vocab_size",
)


@dataclass(frozen=True)
class Family:
    """One model family: which HF architectures, how its config maps, how its params map.

    To add a family, write one file in this folder with its ``RULES`` and a ``config_map`` and list
    its ``FAMILY`` in ``families/__init__.py``:

    * ``config_map(hf, where) -> dict``: the HF config.json dict -> megatron model arguments with
      every key of ``MODEL_ARG_KEYS`` (start from ``common.decoder_args``, which reads the shared keys
      in every transformers 4.x / 5.x spelling). ``where`` names the file for error messages; raise
      ``HfConfigError`` naming the key for anything the family cannot map.
    * ``rules``: the HF <-> mcore parameter map (``Direct`` / ``QKV`` / ``GatedMLP`` above).

    Callers never call ``config_map`` directly: ``hpctrain.model.families.model_args`` picks the
    family and checks the result.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    config_map: Callable[[Mapping[str, Any], str], dict[str, Any]]

    def active_rules(self, tied: bool) -> list[Rule]:
        return [r for r in self.rules if not (tied and r.untied_only)]


def layer_name(pattern: str, i: int) -> str:
    return pattern.replace("*", str(i))


def is_layer_rule(rule: Rule) -> bool:
    return "*" in rule.mcore
