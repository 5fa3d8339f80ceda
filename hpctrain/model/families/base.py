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
* ``ExpertDirect`` / ``ExpertGatedMLP``: one tensor per expert on the HF side (``#`` stands for the
  expert number), stacked on the mcore side along an expert axis after the layer axis
  (SequentialMLP's and GroupedMLP's shared layout: ``mlp.experts.experts.linear_fc1.weight`` is
  [layers, experts, 2 * moe_ffn, hidden]).

Rules apply to every layer (``layers="all"``), or only to the dense (``"dense"``) or MoE (``"moe"``)
layers of a model whose config mixes them. megatron-core names the layers of such a model one by
one (``decoder.layers.3.mlp...``, no layer axis: ``TransformerBlock.sharded_state_dict`` with a
``moe_layer_freq`` list), so ``Geometry.per_layer_keys`` says which naming a checkpoint uses.
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
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense; () = a dense model
    num_experts: int = 0

    @property
    def per_layer_keys(self) -> bool:
        """megatron-core's naming for a model mixing MoE and dense layers (see the module doc)."""
        return any(self.moe_layers) and not all(self.moe_layers)

    def layers_of(self, kind: str) -> list[int]:
        """The layer numbers a rule for ``kind`` ("all", "dense", "moe") covers."""
        if kind == "all":
            return list(range(self.num_layers))
        moe = self.moe_layers or (False,) * self.num_layers
        return [i for i, m in enumerate(moe) if m == (kind == "moe")]


@dataclass(frozen=True)
class Direct:
    mcore: str
    hf: str
    vocab: bool = False
    untied_only: bool = False
    layers: str = "all"

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
    layers: str = "all"

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
    layers: str = "all"

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


def expert_name(pattern: str, e: int) -> str:
    return pattern.replace("#", str(e))


@dataclass(frozen=True)
class ExpertDirect:
    """One HF tensor per expert (``#``) <-> the mcore tensor's expert axis (axis 0 of a layer's)."""

    mcore: str
    hf: str
    untied_only: bool = False
    layers: str = "moe"
    experts: bool = True

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_mcore(self, get, g: Geometry, e: int) -> torch.Tensor:
        return get(expert_name(self.hf, e))

    def to_hf(self, t: torch.Tensor, g: Geometry, e: int) -> dict[str, torch.Tensor]:
        return {expert_name(self.hf, e): t}

    def mcore_shape(self, hf_shapes, g: Geometry) -> tuple:  # of one expert
        return tuple(hf_shapes[self.hf])


@dataclass(frozen=True)
class ExpertGatedMLP:
    """Per-expert gate/up (``#``) <-> one expert's [gate; up] fc1 slice."""

    mcore: str
    gate: str
    up: str
    untied_only: bool = False
    layers: str = "moe"
    experts: bool = True

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def to_mcore(self, get, g: Geometry, e: int) -> torch.Tensor:
        return GatedMLP(self.mcore, expert_name(self.gate, e), expert_name(self.up, e)).to_mcore(get, g)

    def to_hf(self, t: torch.Tensor, g: Geometry, e: int) -> dict[str, torch.Tensor]:
        return GatedMLP(self.mcore, expert_name(self.gate, e), expert_name(self.up, e)).to_hf(t, g)

    def mcore_shape(self, hf_shapes, g: Geometry) -> tuple:
        s = tuple(hf_shapes[self.gate])
        return (2 * s[0],) + s[1:]


Rule = Direct | QKV | GatedMLP | ExpertDirect | ExpertGatedMLP


# What every Family.config_map returns: cfg.model field names (the trainer fills the fields the user
# left unset from them) plus ``vocab_size`` (config.json's real vocabulary, before TP padding).
MODEL_ARG_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "rotary_base", "rotary_percent", "normalization", "norm_epsilon", "swiglu", "disable_bias_linear",
    "add_qkv_bias", "untie_embeddings_and_output_weights", "qk_layernorm", "rope_scaling",
    "torch_dtype", "vocab_size",
)
# What a MoE family's config_map adds (cfg.moe field names; megatron-core's reading of
# moe_layer_freq: an int N = layers 0, N, 2N... are MoE, or a list of 0/1 per layer).
MOE_ARG_KEYS = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
                "moe_layer_freq", "moe_aux_loss_coeff")


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


def is_expert_rule(rule: Rule) -> bool:
    return getattr(rule, "experts", False)


def layer_key(rule: Rule, i: int, g: Geometry) -> str:
    """The checkpoint key of a layer rule: ``decoder.layers.X`` (layers stacked on axis 0) or, for a
    model that mixes MoE and dense layers, ``decoder.layers.<i>.X`` (one tensor per layer)."""
    return rule.mcore.replace(".*.", f".{i}." if g.per_layer_keys else ".")


def moe_pattern(args: Mapping[str, Any]) -> tuple[bool, ...]:
    """Per layer: MoE or dense, from model arguments (megatron-core's reading of moe_layer_freq)."""
    if not args.get("num_experts"):
        return ()
    n, freq = args["num_layers"], args.get("moe_layer_freq", 1)
    if isinstance(freq, str):
        from hpctrain.config.moe_freq import parse_moe_layer_freq

        freq = parse_moe_layer_freq(freq)
    if isinstance(freq, int):
        return tuple(i % freq == 0 for i in range(n))
    return tuple(bool(x) for x in freq)
