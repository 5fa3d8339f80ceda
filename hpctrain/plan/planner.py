"""Make a plan: layout (given or --auto) + checks + rank map + memory estimate, from a JobConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hpctrain.plan.layout import Batch, Cluster, Layout, LayoutCheck, LayoutError, check_layout, divisors, make_layout
from hpctrain.plan.memory import GIB, MemoryEstimate, Training, estimate
from hpctrain.plan.shape import ModelShape, load_shape


@dataclass
class Plan:
    cluster: Cluster
    shape: ModelShape
    layout: Layout
    batch: Batch
    training: Training
    memory: MemoryEstimate
    warnings: list[str] = field(default_factory=list)


def batch_from_config(cfg: Any) -> Batch:
    seq = cfg.data.seq_length or cfg.data.packing_length or cfg.data.max_length or cfg.model.max_position_embeddings
    return Batch(
        micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size,
        seq_length=int(seq or 2048), sequence_parallel=bool(cfg.parallel.sequence_parallel),
        decoder_first_pipeline_num_layers=cfg.parallel.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=cfg.parallel.decoder_last_pipeline_num_layers,
    )


def training_from_config(cfg: Any) -> Training:
    fp32 = not (cfg.precision.bf16 or cfg.precision.fp16) and cfg.model.torch_dtype in ("float32", "fp32")
    return Training(
        dtype_bytes=4 if fp32 else 2, optimizer=cfg.optim.optimizer,
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        recompute_granularity=cfg.train.recompute_granularity, recompute_method=cfg.train.recompute_method,
        recompute_num_layers=cfg.train.recompute_num_layers,
        recompute_core_attn="core_attn" in (cfg.train.recompute_modules or []),
        recompute_mlp_act="mlp_act" in (cfg.train.recompute_modules or []),
        # The portable spec's attention (every job without Transformer Engine) keeps no s x s scores;
        # TE's unfused backend does.
        unfused_attention=cfg.model.transformer_impl == "transformer_engine" and
        cfg.train.attention_backend == "unfused",
        chunked_ce=bool(cfg.train.cross_entropy_loss_fusion),
        lora_rank=cfg.tuner.lora_rank if cfg.tuner.train_type == "lora" else 0,
    )


def plan_layout(shape: ModelShape, cluster: Cluster, lay_or_check: LayoutCheck, batch: Batch, tr: Training,
                gpu_bytes: int | None) -> Plan:
    """Check a layout; raise LayoutError with every broken rule, else return the Plan (with warnings)."""
    if lay_or_check.layout is None:
        raise LayoutError(lay_or_check.problems)
    res = check_layout(shape, cluster, lay_or_check.layout, batch)
    if res.problems:
        raise LayoutError(res.problems)
    mem = estimate(shape, res.layout, batch, tr, gpu_bytes)
    warnings = list(res.warnings)
    if not mem.fits:
        warnings.append(f"estimated {mem.total / GIB:.1f} GiB per GPU exceeds the usable "
                        f"{mem.usable / GIB:.1f} GiB (GPU {gpu_bytes / GIB:.0f} GiB minus headroom): "
                        f"raise TP/PP, enable recompute or the distributed optimizer, or lower micro_batch_size")
    return Plan(cluster, shape, res.layout, batch, tr, mem, warnings)


def auto_plan(shape: ModelShape, cluster: Cluster, cp: int, batch: Batch, tr: Training, gpu_bytes: int | None) -> Plan:
    """The smallest TP (then the smallest PP) whose layout is valid and fits in GPU memory."""
    tried: list[str] = []
    for tp in divisors(cluster.gpus_per_node):
        for pp in divisors(cluster.world_size // tp):
            check = make_layout(cluster, tp, pp, cp)
            if check.layout is None:
                continue
            try:
                plan = plan_layout(shape, cluster, check, batch, tr, gpu_bytes)
            except LayoutError as e:
                tried.append(f"{check.layout.describe()}: {e.problems[0]}")
                continue
            if plan.memory.fits:
                return plan
            tried.append(f"{plan.layout.describe()}: needs {plan.memory.total / GIB:.1f} GiB per GPU")
    raise LayoutError([f"--auto found no layout for {cluster.describe()} with cp({cp}) that is valid and fits"]
                      + tried[:12])


def make_plan(cfg: Any, cluster: Cluster, gpu_memory_gib: float | None = 80.0, auto: bool = False) -> Plan:
    """The plan for a JobConfig on ``cluster``; raises LayoutError / ValueError with the reason."""
    shape = load_shape(cfg.model, cfg.moe)
    batch, tr = batch_from_config(cfg), training_from_config(cfg)
    gpu_bytes = int(gpu_memory_gib * GIB) if gpu_memory_gib else None
    par = cfg.parallel
    if auto:
        return auto_plan(shape, cluster, par.context_parallel_size, batch, tr, gpu_bytes)
    check = make_layout(cluster, par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                        par.context_parallel_size, par.virtual_pipeline_model_parallel_size)
    moe = cfg.moe
    if check.layout is not None and (moe.expert_model_parallel_size > 1 or moe.expert_tensor_parallel_size):
        check.layout = dataclasses.replace(check.layout, ep=moe.expert_model_parallel_size,
                                           etp=moe.expert_tensor_parallel_size)
    return plan_layout(shape, cluster, check, batch, tr, gpu_bytes)
