"""Optimizer (megatron-core's, incl. the distributed optimizer and fp16 loss scaling) and the
LR / weight-decay schedule (megatron-core's OptimizerParamScheduler)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def build_optimizer(cfg, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, pr, t = cfg.optim, cfg.precision, cfg.train
    if o.optimizer_cpu_offload:
        raise ValueError("optimizer_cpu_offload needs megatron-core's hybrid optimizer on CUDA; "
                         "set optimizer_cpu_offload=false")
    if o.optimizer == "sgd" and cfg.parallel.use_distributed_optimizer and not _have_apex_or_te():
        raise ValueError("optimizer='sgd' with use_distributed_optimizer=true needs apex or Transformer Engine "
                         "(megatron-core 0.16.1 reads Adam's 'step' from the state); set "
                         "use_distributed_optimizer=false")
    ocfg = OptimizerConfig(
        optimizer=o.optimizer, lr=learning_rate(cfg), min_lr=t.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=bool(pr.bf16), fp16=bool(pr.fp16),
        loss_scale=pr.static_loss_scale, initial_loss_scale=pr.initial_loss_scale,
        min_loss_scale=pr.min_loss_scale, loss_scale_window=pr.loss_scale_window, hysteresis=pr.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        overlap_param_gather_with_optimizer_step=False, log_num_zeros_in_grad=False,
        barrier_with_L1_time=False, timers=None)
    opt = get_megatron_optimizer(ocfg, model_chunks)
    _fused_torch_adam(opt)
    return opt


def _fused_torch_adam(opt) -> None:
    """Without apex/TE megatron-core falls back to torch.optim.AdamW with its default multi-tensor
    (foreach) kernels, which allocate temporaries in the step; torch's fused CUDA kernel updates in
    place. Switch to it when every parameter is on CUDA. Same update rule; results differ from
    foreach in the last bits. (It did not lower the 7B seed recipe's peak, 94.9 GiB per GPU: the
    optimizer step is not where that peak is; docs/benchmarks.md.)"""
    import torch

    inner = [getattr(o, "optimizer", None) for o in getattr(opt, "chained_optimizers", [opt])]
    for o in inner:
        if not isinstance(o, (torch.optim.AdamW, torch.optim.Adam)):
            continue
        params = [p for g in o.param_groups for p in g["params"]]
        if params and all(p.is_cuda for p in params):
            for g in o.param_groups:
                g["foreach"], g["fused"] = False, True


def _have_apex_or_te() -> bool:
    from megatron.core.optimizer import distrib_optimizer
    return bool(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False))


def learning_rate(cfg) -> float:
    return cfg.train.lr if cfg.train.lr is not None else 1e-5


def warmup_iters(cfg, decay_iters: int) -> int:
    t = cfg.train
    if t.lr_warmup_fraction is not None:
        if t.lr_warmup_iters:
            raise ValueError("set only one of lr_warmup_iters and lr_warmup_fraction")
        return int(t.lr_warmup_fraction * decay_iters)
    return t.lr_warmup_iters


def build_scheduler(cfg, optimizer, train_iters: int):
    """Steps are counted in iterations (Megatron-LM counts samples; the schedule is the same).

    Iteration ``i`` (1-based) trains with ``schedule(i)``: the warmup reaches ``lr`` at iteration
    ``lr_warmup_iters`` and the decay reaches ``min_lr`` at ``lr_decay_iters``. megatron-core's
    scheduler alone applies ``schedule(num_steps)`` with num_steps = iterations done, so the first
    iteration of a warmup would train with lr 0 (Megatron-LM does that too, and logs the lr of the
    NEXT iteration, so its log shows a non-zero lr at iteration 1); see _NextStepScheduler.
    """
    t = cfg.train
    decay = t.lr_decay_iters or train_iters
    lr = learning_rate(cfg)
    if t.min_lr > lr:
        raise ValueError(f"min_lr ({t.min_lr}) must be <= lr ({lr})")
    warmup = warmup_iters(cfg, decay)
    if warmup >= decay:  # megatron-core asserts warmup < decay
        log.warning("lr warmup (%d iterations) is not shorter than the decay (%d): decaying over %d iterations "
                    "instead (the LR never leaves warmup in this run)", warmup, decay, warmup + 1)
        decay = warmup + 1
    return _scheduler_class()(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=t.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(decay, 1),
        lr_decay_style=t.lr_decay_style, start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay,
        wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)


def _scheduler_class():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _NextStepScheduler(OptimizerParamScheduler):
        """megatron-core's scheduler, but the lr it sets is the one of the iteration about to run
        (num_steps + 1). Its state (num_steps = iterations done) is megatron-core's, so checkpoints
        keep their meaning and a resumed run continues the same schedule."""

        def get_lr(self, param_group: dict) -> float:
            self.num_steps += 1
            try:
                return super().get_lr(param_group)
            finally:
                self.num_steps -= 1

    return _NextStepScheduler
