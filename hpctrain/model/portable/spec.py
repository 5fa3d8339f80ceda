"""The portable (TE-free, apex-free) megatron-core GPT layer spec.

Same module tree and checkpoint keys as megatron-core's local spec (get_gpt_layer_local_spec), with
PortableAttention (SDPA / flex_attention, packed sequences, context parallel) as core attention and
PortableNorm (sequence-parallel capable) as the norms. Use the block spec so the final norm is also
portable (megatron's default final norm for a layer spec asserts when sequence parallel is on).

Mixture of experts (``num_moe_experts``): the layers ``moe_layer_freq`` marks get megatron-core's
MoELayer (its router, aux loss and token dispatcher) with SequentialMLP experts, or, with
``moe_grouped_gemm``, PortableGroupedMLP (experts.py); the others the dense MLP. MoE layers keep their
pre-MLP norm under ``pre_mlp_layernorm.weight``, as megatron-core's TE spec saves it (there is no
fc1 for it to live in).
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from hpctrain.model.portable.attention import PortableAttention
from hpctrain.model.portable.mlp import PortableMLP
from hpctrain.model.portable.norm import PortableNorm
from hpctrain.model.portable.self_attention import PortableSelfAttention


def moe_mlp_spec(grouped: bool) -> ModuleSpec:
    """megatron-core's MoELayer with sequential (per-expert loop) or grouped-GEMM experts."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    from hpctrain.model.portable.experts import PortableGroupedMLP

    experts = (ModuleSpec(module=PortableGroupedMLP) if grouped else ModuleSpec(
        module=SequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=None),
                      metainfo={"fuse_pre_mlp_layernorm": False})


def get_portable_layer_spec(qk_layernorm: bool = False, recompute_act: bool = False, moe: bool = False,
                            grouped: bool = False) -> ModuleSpec:
    """ModuleSpec of one GPT transformer layer: dense MLP, or (``moe``) megatron-core's MoE layer.

    recompute_act: recompute the MLP's SwiGLU output in the backward instead of keeping it
    (``recompute_modules`` entry ``mlp_act``; see mlp.py). grouped: grouped-GEMM experts."""
    qk_norm = PortableNorm if qk_layernorm else IdentityOp
    keys = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not moe:
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    mlp = moe_mlp_spec(grouped) if moe else ModuleSpec(
        module=PortableMLP, params={"recompute_act": recompute_act},
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=PortableNorm,
            self_attention=ModuleSpec(
                module=PortableSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=PortableAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=PortableNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the local and TE specs (norms live inside the linears there).
            sharded_state_dict_keys_map=keys,
        ),
    )


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Which of the model's layers are MoE layers (megatron-core's reading of ``moe_layer_freq``:
    an int N marks layers 0, N, 2N, ...; a list gives 1/0 per layer)."""
    n = config.num_layers
    if not getattr(config, "num_moe_experts", None):
        return [False] * n
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(n)]
    if len(freq) != n:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {n} layers; give one 0/1 per layer")
    return [bool(x) for x in freq]


def get_portable_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                            pp_rank: Optional[int] = None, recompute_act: bool = False) -> ModuleSpec:
    """ModuleSpec of the decoder block for this pipeline stage: layers + a portable final norm.

    Pass it to GPTModel(transformer_layer_spec=...).
    """
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    qk = bool(config.qk_layernorm)
    grouped = bool(getattr(config, "moe_grouped_gemm", False))
    specs = [get_portable_layer_spec(qk_layernorm=qk, recompute_act=recompute_act, moe=m, grouped=grouped)
             for m in moe_layer_pattern(config)]
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=specs[offset:offset + n], layer_norm=PortableNorm),
    )
