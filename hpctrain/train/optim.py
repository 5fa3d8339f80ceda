"""Optimizer (megatron-core's, incl. the distributed optimizer and fp16 loss scaling) and the
LR / weight-decay schedule (megatron-core's OptimizerParamScheduler, with Megatron-LM's resume rules)."""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


def build_optimizer(cfg, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, pr, t = cfg.optim, cfg.precision, cfg.train
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


def build_scheduler(cfg, optimizer, train_iters: int):
    """megatron-core's OptimizerParamScheduler with Megatron-LM's arguments.

    Megatron-LM counts the schedule in samples (every count times global_batch_size) and steps it by the
    global batch size; the lr depends only on ratios of those counts, so counting iterations gives the same
    lr at every iteration. As in Megatron-LM, iteration i trains with the lr of i-1 scheduler steps:
    with a warmup the first iteration trains at lr 0 (lr_warmup_init), without one at the peak lr.
    """
    from hpctrain.config.validate import lr_warmup

    t = cfg.train
    decay = t.lr_decay_iters or train_iters
    # checked by the config already, unless train_iters comes from max_epochs
    warmup = lr_warmup(t.lr_warmup_iters, t.lr_warmup_fraction, decay)
    return _schedule_class()(
        optimizer, init_lr=0.0, max_lr=learning_rate(cfg), min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=t.lr_decay_style, start_wd=cfg.optim.weight_decay,
        end_wd=cfg.optim.weight_decay, wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=t.override_opt_param_scheduler,
        wsd_decay_steps=t.lr_wsd_decay_iters, lr_wsd_decay_style=t.lr_wsd_decay_style)


# The values a checkpoint's scheduler state holds, and what they are called for the user.
_SCHEDULE_KEYS = {"max_lr": "lr", "min_lr": "min_lr", "lr_warmup_steps": "warmup iterations",
                  "lr_decay_steps": "lr_decay_iters", "lr_decay_style": "lr_decay_style",
                  "start_wd": "weight_decay", "end_wd": "weight_decay (end)",
                  "wd_incr_steps": "train_iters (weight-decay schedule)", "wd_incr_style": "weight-decay style"}


@functools.cache
def _schedule_class():
    """megatron-core's scheduler; on resume it also says which schedule is in force, and a changed schedule
    without override_opt_param_scheduler / use_checkpoint_opt_param_scheduler is a one-line error
    (megatron-core would stop with an AssertionError; it never continues silently at the old schedule).
    Made on first use: importing megatron-core costs seconds."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class Schedule(OptimizerParamScheduler):
        def load_state_dict(self, state_dict: dict) -> None:
            changed = _changes(self.state_dict(), state_dict)
            if changed and not (self.override_opt_param_scheduler or self.use_checkpoint_opt_param_scheduler):
                from hpctrain.config import ConfigError
                raise ConfigError(f"the checkpoint's LR schedule differs from this run's ({changed}, checkpoint -> "
                                  "now): pass --override_opt_param_scheduler true to use this run's, or "
                                  "--use_checkpoint_opt_param_scheduler true to keep the checkpoint's")
            super().load_state_dict(state_dict)
            which = ("unchanged" if not changed else "this run's (override_opt_param_scheduler)"
                     if self.override_opt_param_scheduler else "the checkpoint's (use_checkpoint_opt_param_scheduler)")
            log.info("LR schedule on resume: %s%s; at step %d: lr %.4g (peak %.4g, min %.4g, warmup %g, %s decay "
                     "over %g iterations)", which, f" [{changed}]" if changed else "", self.num_steps,
                     self.optimizer.param_groups[0]["lr"], self.max_lr, self.min_lr, self.lr_warmup_steps,
                     self.lr_decay_style, self.lr_decay_steps)

    return Schedule


def _changes(mine: dict, saved: dict) -> str:
    """'lr_decay_iters 10 -> 20, ...' for the schedule values that differ (checkpoint -> this run)."""
    return ", ".join(f"{name} {saved[k]!r} -> {mine[k]!r}" for k, name in _SCHEDULE_KEYS.items()
                     if k in saved and saved[k] != mine[k])
