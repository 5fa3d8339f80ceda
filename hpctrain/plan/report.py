"""Human-readable (and JSON) rendering of a Plan."""
from __future__ import annotations

from typing import Any

from hpctrain.plan.memory import GIB
from hpctrain.plan.planner import Plan
from hpctrain.plan.ranks import groups, rank_map

MAX_LISTED_GROUPS = 8


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _group_lines(plan: Plan) -> list[str]:
    lines = []
    kinds = ["tp", "pp", "dp"] + (["cp", "dp-cp"] if plan.layout.cp > 1 else [])
    for kind in kinds:
        gs = groups(plan.layout, kind)
        shown = " ".join(str(g) for g in gs[:MAX_LISTED_GROUPS])
        more = f" ... ({len(gs)} groups)" if len(gs) > MAX_LISTED_GROUPS else ""
        lines.append(f"  {kind.upper():5s} groups: {shown}{more}")
    return lines


def _rank_lines(plan: Plan, max_nodes: int = 2) -> list[str]:
    lines, g = [], plan.cluster.gpus_per_node
    places = rank_map(plan.layout, g)
    for node in range(min(plan.cluster.nodes, max_nodes)):
        cells = [f"gpu{p.gpu}:r{p.rank}(tp{p.tp} cp{p.cp} dp{p.dp} pp{p.pp})"
                 for p in places[node * g:(node + 1) * g]]
        lines.append(f"  node {node}: " + "  ".join(cells))
    if plan.cluster.nodes > max_nodes:
        lines.append(f"  ... nodes {max_nodes}..{plan.cluster.nodes - 1} follow the same pattern "
                     f"(rank = node * {g} + gpu)")
    return lines


def _moe_lines(plan: Plan) -> list[str]:
    s, lay = plan.shape, plan.layout
    if not s.num_experts:
        return []
    return [f"MoE: {s.moe_layers} of {s.num_layers} layers, {s.num_experts} experts (top-{s.moe_router_topk}, "
            f"ffn {s.moe_ffn_hidden_size}) over EP {lay.ep} x ETP {lay.expert_tp} (expert-DP {lay.expert_dp}); "
            f"params {s.params() / 1e9:.2f}B total, {s.params(active=True) / 1e9:.2f}B active per token"]


def format_plan(plan: Plan) -> str:
    lay, mem, s = plan.layout, plan.memory, plan.shape
    out = [
        f"plan: {lay.describe()} on {plan.cluster.describe()}  "
        f"[tp({lay.tp}) * pp({lay.pp}) * cp({lay.cp}) * dp({lay.dp}) = {lay.world_size}]",
        f"model: {s.num_layers} layers, hidden {s.hidden_size}, ffn {s.ffn_hidden_size}, "
        f"{s.num_attention_heads} heads / {s.num_query_groups} query groups, vocab {s.vocab_size} ({s.source})",
        *_moe_lines(plan),
        f"batch: micro {plan.batch.micro_batch_size} x dp {lay.dp} x accumulation "
        f"{plan.batch.global_batch_size // (plan.batch.micro_batch_size * lay.dp)} = global "
        f"{plan.batch.global_batch_size}; seq_length {plan.batch.seq_length}",
        "rank -> node/GPU (megatron-core order tp-cp-dp-pp):",
        *_rank_lines(plan),
        "groups:",
        *_group_lines(plan),
        f"memory per GPU (busiest stage, {mem.params / 1e6:.1f}M params): weights {_gib(mem.weights)}, "
        f"grads {_gib(mem.grads)}, optimizer {_gib(mem.optimizer)}, activations {_gib(mem.activations)} "
        f"= {_gib(mem.total)}" + (f" of {_gib(mem.gpu_bytes)}" if mem.gpu_bytes else ""),
    ]
    out += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(out)


def plan_dict(plan: Plan) -> dict[str, Any]:
    lay, mem = plan.layout, plan.memory
    return {
        "nodes": plan.cluster.nodes, "gpus_per_node": plan.cluster.gpus_per_node,
        "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp, "vpp": lay.vpp, "ep": lay.ep, "etp": lay.expert_tp,
        "params": {"total": plan.shape.params(), "active": plan.shape.params(active=True)},
        "memory_bytes": {"weights": mem.weights, "grads": mem.grads, "optimizer": mem.optimizer,
                         "activations": mem.activations, "total": mem.total, "gpu": mem.gpu_bytes},
        "fits": mem.fits, "warnings": plan.warnings,
        "groups": {k: groups(lay, k) for k in ("tp", "pp", "dp", "cp")},
    }
