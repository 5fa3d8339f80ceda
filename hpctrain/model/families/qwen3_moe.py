"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B): Qwen3's attention, and in the MoE layers a
softmax router over ``num_experts`` experts choosing ``num_experts_per_tok``, SwiGLU experts of
``moe_intermediate_size``, no shared expert.

Mapping to megatron-core's MoELayer:
* ``norm_topk_prob = true`` (renormalise the top-k probabilities): megatron's default router order
  (top-k of the logits, then softmax over them), ``moe_router_pre_softmax = false``; ``false``: softmax
  over all experts, then top-k (``moe_router_pre_softmax = true``). Scores are fp32 in both.
* ``router_aux_loss_coef`` -> ``moe_aux_loss_coeff`` (load-balancing loss, see docs/moe.md for how
  megatron's per-layer sum relates to HF's loss over all layers' router logits).
* Which layers are MoE: HF makes layer i sparse when i is not in ``mlp_only_layers`` and
  (i + 1) % ``decoder_sparse_step`` == 0; megatron's ``moe_layer_freq`` gets 1 (all MoE) or the list.
* transformers 5 writes the expert count as ``num_local_experts``, 4.x as ``num_experts``.
"""
from __future__ import annotations

from typing import Any, Mapping

from hpctrain.model.families.base import (Direct, ExpertDirect, ExpertGatedMLP, Family, GatedMLP,
                                          HfConfigError)
from hpctrain.model.families.common import flag, integer, number
from hpctrain.model.families.qwen3 import ATTENTION, EMBEDDINGS, qwen3_args

DENSE = (
    Direct("decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
           "model.layers.*.post_attention_layernorm.weight", layers="dense"),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_proj.weight",
             "model.layers.*.mlp.up_proj.weight", layers="dense"),
    Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight", layers="dense"),
)
SPARSE = (
    Direct("decoder.layers.*.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight",
           layers="moe"),
    Direct("decoder.layers.*.mlp.router.weight", "model.layers.*.mlp.gate.weight", layers="moe"),
    ExpertGatedMLP("decoder.layers.*.mlp.experts.experts.linear_fc1.weight",
                   "model.layers.*.mlp.experts.#.gate_proj.weight", "model.layers.*.mlp.experts.#.up_proj.weight"),
    ExpertDirect("decoder.layers.*.mlp.experts.experts.linear_fc2.weight",
                 "model.layers.*.mlp.experts.#.down_proj.weight"),
)
RULES = EMBEDDINGS + ATTENTION + DENSE + SPARSE


def _experts(hf: Mapping[str, Any], where: str) -> int:
    a, b = hf.get("num_experts"), hf.get("num_local_experts")
    if a is not None and b is not None and a != b:
        raise HfConfigError(f"{where}: num_experts = {a} and num_local_experts = {b} disagree; keep one")
    return integer(hf, "num_experts" if a is not None else "num_local_experts", where, default=128)


def moe_layers(hf: Mapping[str, Any], where: str, n: int) -> list[int]:
    """1 (MoE) / 0 (dense) per layer, as transformers' Qwen3MoeDecoderLayer decides."""
    step = integer(hf, "decoder_sparse_step", where, default=1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in only):
        raise HfConfigError(f"{where}: mlp_only_layers = {only!r} is not a list of layer numbers; fix config.json")
    return [int(i not in only and (i + 1) % step == 0) for i in range(n)]


def config_map(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """HF config.json -> Megatron model arguments (cfg.model field names + cfg.moe field names)."""
    if hf.get("shared_expert_intermediate_size"):
        raise HfConfigError(f"{where}: shared_expert_intermediate_size is set: shared experts (Qwen2-MoE) are "
                            "not part of the Qwen3-MoE mapping; only Qwen3MoeForCausalLM checkpoints convert")
    args = qwen3_args(hf, where)
    pattern = moe_layers(hf, where, args["num_layers"])
    if not any(pattern):
        raise HfConfigError(f"{where}: no layer is a MoE layer (mlp_only_layers / decoder_sparse_step); "
                            "use Qwen3ForCausalLM for a dense model")
    topk = integer(hf, "num_experts_per_tok", where, default=8)
    experts = _experts(hf, where)
    if topk > experts:
        raise HfConfigError(f"{where}: num_experts_per_tok = {topk} > {experts} experts; fix config.json")
    args.update(
        num_experts=experts, moe_router_topk=topk,
        moe_ffn_hidden_size=integer(hf, "moe_intermediate_size", where),
        moe_router_pre_softmax=not flag(hf, "norm_topk_prob", where, False),
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_aux_loss_coeff=0.0 if hf.get("router_aux_loss_coef") == 0 else number(hf, "router_aux_loss_coef",
                                                                                 where, 0.001),
    )
    return args


FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",),
                rules=RULES, config_map=config_map)
