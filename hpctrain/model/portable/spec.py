"""The portable (TE-free, apex-free) megatron-core GPT layer spec.

Same module tree and checkpoint keys as megatron-core's local spec (get_gpt_layer_local_spec), with
PortableAttention (SDPA / flex_attention, packed sequences, context parallel) as core attention and
PortableNorm (sequence-parallel capable) as the norms. Use the block spec so the final norm is also
portable (megatron's default final norm for a layer spec asserts when sequence parallel is on).
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


def get_portable_layer_spec(qk_layernorm: bool = False, recompute_act: bool = False) -> ModuleSpec:
    """ModuleSpec of one GPT transformer layer (dense MLP; num_experts is not supported).

    recompute_act: recompute the MLP's SwiGLU output in the backward instead of keeping it
    (``recompute_modules`` entry ``mlp_act``; see mlp.py)."""
    qk_norm = PortableNorm if qk_layernorm else IdentityOp
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
            mlp=ModuleSpec(
                module=PortableMLP,
                params={"recompute_act": recompute_act},
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the local and TE specs (norms live inside the linears there).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_portable_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                            pp_rank: Optional[int] = None) -> ModuleSpec:
    """ModuleSpec of the decoder block for this pipeline stage: layers + a portable final norm.

    Pass it to GPTModel(transformer_layer_spec=...).
    """
    if getattr(config, "num_moe_experts", None):
        raise NotImplementedError("portable spec: mixture-of-experts is not supported")
    layer = get_portable_layer_spec(qk_layernorm=bool(config.qk_layernorm))
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=PortableNorm),
    )
