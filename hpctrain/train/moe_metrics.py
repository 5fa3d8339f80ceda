"""The MoE load-balancing loss for the log (logging.jsonl's ``load_balancing_loss``, as Megatron-LM names it).

megatron-core's router adds each MoE layer's aux loss (without its coefficient) to a tracker once per
training forward with gradients, as a partial sum over the tokens of its TP x CP rank (under activation
recompute the first forward runs without gradients, so each micro-batch still counts once). The value
logged is, per MoE layer, the mean over the step's micro-batches on all DP ranks, then the mean over the
MoE layers: what Megatron-LM's ``track_moe_metrics`` logs. The reduction here is sums only (gloo has no
AVG reduce): over TP x CP (the partial sums), pipeline stages (each holds its own layers; a stage
without MoE layers adds zeros) and DP.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

NAME = "load_balancing_loss"


def has_aux_loss(chunks: list) -> bool:
    from megatron.core.utils import get_model_config

    cfg = get_model_config(chunks[0])
    return bool(getattr(cfg, "num_moe_experts", None)) and bool(cfg.moe_aux_loss_coeff) \
        and cfg.moe_router_load_balancing_type == "aux_loss"


def load_balancing_loss(chunks: list, num_microbatches: int, device: torch.device) -> float:
    """The step's value (every rank takes part: collectives); clears the tracker for the next step."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.utils import get_model_config

    from hpctrain.model.portable.spec import moe_layer_pattern

    cfg = get_model_config(chunks[0])
    entry = get_moe_layer_wise_logging_tracker().get(NAME)
    values = (entry["values"].detach().to(torch.float64) if entry is not None
              else torch.zeros(cfg.num_layers + (cfg.mtp_num_layers or 0), dtype=torch.float64, device=device))
    for group in (ps.get_tensor_and_context_parallel_group(), ps.get_pipeline_model_parallel_group(),
                  ps.get_data_parallel_group()):
        tdist.all_reduce(values, group=group)
    if entry is not None:
        entry["values"].zero_()
    values = values / (num_microbatches * ps.get_data_parallel_world_size())
    moe = [i for i, is_moe in enumerate(moe_layer_pattern(cfg)) if is_moe]
    return float(values[moe].mean())
