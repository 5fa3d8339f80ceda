"""Build a megatron-core GPTModel for a model family / a converted checkpoint.

The layer-spec choice lives in ONE place, ``select_layer_spec``.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import torch

from hpctrain.model import mcore_config
from hpctrain.model.families import model_args


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def select_layer_spec(cfg, recompute_act: bool = False, vp_stage: int | None = None):
    """The transformer layer spec for a TransformerConfig ``cfg`` (for a MoE model: the block spec of
    this pipeline stage / virtual stage ``vp_stage``, whose layers are MoE or dense by moe_layer_freq).

    Transformer Engine's spec when TE is importable and ``cfg.transformer_impl ==
    "transformer_engine"``; otherwise hpctrain's portable spec (megatron-core's TP linears +
    SDPA/flex attention with packed sequences and context parallel, SP-capable norms; same
    checkpoint keys as megatron-core's local spec, see hpctrain/model/portable/spec.py).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if getattr(cfg, "transformer_impl", "local") == "transformer_engine" and te_available():
        if recompute_act:
            raise ValueError("recompute_modules 'mlp_act' is a portable-spec option: drop it, or set "
                             "transformer_impl = 'local'")
        if cfg.num_moe_experts:
            return specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=True, vp_stage=vp_stage)
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    from hpctrain.model.portable import get_portable_block_spec, get_portable_layer_spec

    if cfg.num_moe_experts:
        return get_portable_block_spec(cfg, vp_stage=vp_stage, recompute_act=recompute_act)
    return get_portable_layer_spec(qk_layernorm=bool(cfg.qk_layernorm), recompute_act=recompute_act)


def model_args_from_hf(hf_config: Mapping[str, Any], *, padded_vocab_size: int | None = None,
                       tp: int = 1, where: str = "config.json") -> dict:
    """Megatron model arguments of an HF config dict (``families.model_args``, the one mapping) plus
    ``padded_vocab_size``: the checkpoint's embedding rows when known, else ``padded_vocab``."""
    args = model_args(hf_config, where)
    args["padded_vocab_size"] = padded_vocab_size or mcore_config.padded_vocab(args["vocab_size"], tp)
    return args


def build_gpt_model(args: Mapping[str, Any], *, params_dtype: torch.dtype = torch.float32,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    sequence_parallel: bool = False, **config_overrides: Any):
    """A GPTModel for this rank of the initialised megatron-core parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    etp = ps.get_expert_tensor_parallel_world_size()
    cfg = mcore_config.transformer_config(args, tp=tp, pp=pp, ep=ep, etp=etp, params_dtype=params_dtype,
                                          sequence_parallel=sequence_parallel, **config_overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    model = GPTModel(cfg, select_layer_spec(cfg, vp_stage=None), pre_process=pre_process,
                     post_process=post_process, **mcore_config.gpt_model_kwargs(args))
    return model.to(params_dtype)
