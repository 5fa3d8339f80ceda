"""Whole-config checks after resolve(): types, choices, refused values, ranges and contradictions.

Every message names the key(s), the offending value(s) and what to change.
"""
from __future__ import annotations

import dataclasses
import re

from hpctrain.config.coerce import coerce
from hpctrain.config.errors import ConfigError
from hpctrain.config.fields import field_default, field_unsupported
from hpctrain.config.job import JobConfig
from hpctrain.config.moe_freq import parse_moe_layer_freq
from hpctrain.config.refusals import check_value_refusals, unbuilt_message
from hpctrain.config.sections import SECTIONS

TRAIN_MODES = ("sft", "pt")
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?|UNLIMITED|INFINITE)$")


def _check_fields(cfg: JobConfig) -> None:
    """Each value has its declared type and one of its choices; keys of features that are not built keep
    their defaults (the user cannot set them: spellings.py refuses; this catches configs built in code)."""
    for sec in SECTIONS:
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            where = f"config key '{sec}.{f.name}'"
            coerce(sec, f.name, value, where=where)  # raises on a wrong type or a value outside the choices
            if field_unsupported(f) and value != field_default(f):
                raise ConfigError(f"{where} = {value!r}: not supported yet: {unbuilt_message(sec, f.name)}")


# (key, lowest allowed value); None values are skipped (unset optional keys).
_LOWER_BOUNDS = {
    "train.micro_batch_size": 1, "train.global_batch_size": 1, "train.train_iters": 1, "train.max_epochs": 1,
    "train.lr_warmup_iters": 0, "train.lr_decay_iters": 1, "train.recompute_num_layers": 1,
    "train.manual_gc_interval": 0, "parallel.tensor_model_parallel_size": 1,
    "parallel.pipeline_model_parallel_size": 1, "parallel.context_parallel_size": 1,
    "parallel.virtual_pipeline_model_parallel_size": 1, "checkpoint.save_interval": 1, "log.log_interval": 1,
    "eval.eval_interval": 1, "data.num_workers": 0, "data.dataset_num_proc": 1, "data.max_length": 1,
    "data.packing_length": 1, "data.seq_length": 1, "launch.nproc_per_node": 1, "slurm.nodes": 1,
    "slurm.gpus_per_node": 1, "slurm.max_requeue": 0, "slurm.signal_before_s": 0,
}


def _value(cfg: JobConfig, key: str):
    sec, name = key.split(".")
    return getattr(getattr(cfg, sec), name)


def _positive(cfg: JobConfig) -> None:
    for key, low in _LOWER_BOUNDS.items():
        value = _value(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"config key '{key}' = {value}: must be >= {low}")
    for key, value in [("train.lr", cfg.train.lr), ("train.min_lr", cfg.train.min_lr),
                       ("optim.weight_decay", cfg.optim.weight_decay), ("optim.clip_grad", cfg.optim.clip_grad)]:
        if value is not None and value < 0:
            raise ConfigError(f"config key '{key}' = {value}: must be >= 0")
    for key, value in [("optim.adam_beta1", cfg.optim.adam_beta1), ("optim.adam_beta2", cfg.optim.adam_beta2)]:
        if not 0 <= value < 1:
            raise ConfigError(f"config key '{key}' = {value}: must be in [0, 1)")
    if not 0 <= cfg.data.split_dataset_ratio < 1:
        raise ConfigError(f"config key 'data.split_dataset_ratio' = {cfg.data.split_dataset_ratio}: must be in [0, 1)")
    if cfg.train.lr_warmup_fraction is not None and not 0 <= cfg.train.lr_warmup_fraction <= 1:
        raise ConfigError(f"config key 'train.lr_warmup_fraction' = {cfg.train.lr_warmup_fraction}: must be in [0, 1]")


def _recompute(cfg: JobConfig) -> None:
    t = cfg.train
    if t.recompute_method is not None and t.recompute_granularity != "full":
        raise ConfigError(f"train.recompute_method = {t.recompute_method!r} needs train.recompute_granularity = "
                          f"'full' (it is {t.recompute_granularity!r}): set --recompute_granularity full "
                          "or drop recompute_method")
    if t.recompute_num_layers is not None and t.recompute_granularity != "full":
        raise ConfigError(f"train.recompute_num_layers = {t.recompute_num_layers} needs train.recompute_granularity"
                          f" = 'full' (it is {t.recompute_granularity!r}): set --recompute_granularity full "
                          "or drop recompute_num_layers")
    if t.recompute_granularity == "full" and (t.recompute_method is None or t.recompute_num_layers is None):
        raise ConfigError("train.recompute_granularity = 'full' needs train.recompute_method ('uniform' or 'block') "
                          "and train.recompute_num_layers, e.g. --recompute_method uniform --recompute_num_layers 1")


def _parallel(cfg: JobConfig) -> None:
    par = cfg.parallel
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel = true needs tensor_model_parallel_size > 1 (it is 1): "
                          "set --tensor_model_parallel_size 2 or more, or --sequence_parallel false")
    if par.virtual_pipeline_model_parallel_size is not None and par.pipeline_model_parallel_size == 1:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
    for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        if getattr(par, key) is not None and par.pipeline_model_parallel_size == 1:
            raise ConfigError(f"parallel.{key} needs pipeline_model_parallel_size > 1 (it is 1)")
    if par.overlap_param_gather and not (par.use_distributed_optimizer and par.overlap_grad_reduce):
        raise ConfigError("parallel.overlap_param_gather = true needs use_distributed_optimizer = true and "
                          "overlap_grad_reduce = true")
    _moe(cfg)
    la = cfg.launch
    if la.nproc_per_node is not None and la.cuda_visible_devices:
        gpus = [g for g in la.cuda_visible_devices.split(",") if g.strip()]
        if la.nproc_per_node > len(gpus):
            raise ConfigError(f"NPROC_PER_NODE / launch.nproc_per_node = {la.nproc_per_node} but "
                              f"CUDA_VISIBLE_DEVICES={la.cuda_visible_devices!r} lists only {len(gpus)} GPU(s)")


def _moe(cfg: JobConfig) -> None:
    """MoE layouts that cannot work, where the shape is already in the config (config.json's is checked
    when the trainer reads it: train/model_source.check_moe_layout)."""
    moe = cfg.moe
    if moe.expert_model_parallel_size < 1 or (moe.expert_tensor_parallel_size or 1) < 1:
        raise ConfigError("moe.expert_model_parallel_size and expert_tensor_parallel_size must be >= 1")
    if moe.num_experts and moe.num_experts % moe.expert_model_parallel_size:
        raise ConfigError(f"moe.expert_model_parallel_size = {moe.expert_model_parallel_size} does not divide "
                          f"num_experts = {moe.num_experts}; pick an EP that divides it")
    if moe.moe_layer_freq is not None:
        parse_moe_layer_freq(moe.moe_layer_freq)
    if moe.moe_token_dispatcher_type == "allgather" and moe.expert_model_parallel_size > 1:
        raise ConfigError("moe.moe_token_dispatcher_type = 'allgather' with expert_model_parallel_size > 1: that "
                          "dispatcher all-gathers equal token counts from every EP rank, and batches of "
                          "different lengths do not have them; use alltoall")


def _training(cfg: JobConfig) -> None:
    t, p = cfg.train, cfg.precision
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size})")
    if p.fp16 and p.bf16:
        raise ConfigError("precision.fp16 and precision.bf16 are both true: choose one")
    dtype = cfg.model.torch_dtype
    if dtype and ((p.fp16 and dtype == "bfloat16") or (p.bf16 and dtype == "float16")):
        raise ConfigError(f"model.torch_dtype = {dtype!r} contradicts precision "
                          f"{'fp16' if p.fp16 else 'bf16'} = true: make them agree")
    for key in ("model_name", "model_author"):
        names = getattr(cfg.data, key)
        if names is not None and not 1 <= len(names) <= 2:
            raise ConfigError(f"data.{key} takes one or two values (Chinese, English), got {len(names)}: {names!r}")
    for i, ds in enumerate(cfg.data.dataset + cfg.data.val_dataset):
        if not ds.strip():
            raise ConfigError(f"data.dataset / val_dataset entry {i} is empty")


def _export_and_slurm(cfg: JobConfig) -> None:
    e = cfg.export
    if e.to_mcore and e.to_hf:
        raise ConfigError("export.to_mcore and export.to_hf are both true: convert one way per command")
    if e.to_mcore and not cfg.model.model:
        raise ConfigError("export.to_mcore = true needs --model (the HF model directory)")
    if e.to_hf and not (e.mcore_model or cfg.model.load):
        raise ConfigError("export.to_hf = true needs --mcore_model (the mcore checkpoint directory)")
    if cfg.slurm.time is not None and not _SLURM_TIME.match(cfg.slurm.time):
        raise ConfigError(f"slurm.time = {cfg.slurm.time!r} is not a Slurm time: use minutes, 'HH:MM:SS' "
                          "or 'D-HH:MM:SS'")


def lr_warmup(warmup_iters: int, warmup_fraction: float | None, decay: int) -> float:
    """The warmup in iterations, as Megatron-LM derives it (lr_warmup_fraction is a fraction of the decay,
    not rounded); megatron-core's scheduler needs it shorter than the decay."""
    warmup = warmup_fraction * decay if warmup_fraction is not None else warmup_iters
    if warmup >= decay:
        raise ConfigError(f"the LR warmup ({warmup:g} iterations) must end before the decay does (lr_decay_iters "
                          f"= {decay}, default train_iters): lower lr_warmup_iters / lr_warmup_fraction or raise "
                          "lr_decay_iters")
    return warmup


def _schedule(cfg: JobConfig) -> None:
    """The LR schedule megatron-core's OptimizerParamScheduler can run (it asserts warmup < decay)."""
    t = cfg.train
    if t.lr_warmup_fraction is not None and t.lr_warmup_iters:
        raise ConfigError(f"train.lr_warmup_iters ({t.lr_warmup_iters}) and train.lr_warmup_fraction "
                          f"({t.lr_warmup_fraction}) are both set: keep only one")
    if t.lr is not None and t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) is larger than train.lr ({t.lr})")
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_iters is None:
        raise ConfigError("train.lr_decay_style = 'WSD' needs train.lr_wsd_decay_iters (the iterations of the "
                          "final anneal), e.g. --lr_wsd_decay_iters 100")
    if t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler:
        raise ConfigError("train.override_opt_param_scheduler and train.use_checkpoint_opt_param_scheduler are "
                          "both true: on resume use this run's schedule (override) or the checkpoint's, not both")
    decay = t.lr_decay_iters
    if decay is None:
        return  # from max_epochs: the trainer checks once it knows the dataset size
    lr_warmup(t.lr_warmup_iters, t.lr_warmup_fraction, decay)
    if t.lr_wsd_decay_iters is not None and t.lr_wsd_decay_iters > decay:
        raise ConfigError(f"train.lr_wsd_decay_iters ({t.lr_wsd_decay_iters}) is longer than the decay "
                          f"(lr_decay_iters = {decay})")


def _checkpoint_and_model(cfg: JobConfig) -> None:
    ck, par, m = cfg.checkpoint, cfg.parallel, cfg.model
    if ck.ckpt_format == "torch":
        if not (ck.no_save_optim and ck.no_save_rng):
            raise ConfigError("checkpoint.ckpt_format = 'torch' (Megatron-LM's per-rank files) is written with the "
                              "weights, iteration and LR schedule only: set no_save_optim = true and no_save_rng = "
                              "true, or use ckpt_format = torch_dist (which keeps them for an exact resume)")
        if par.virtual_pipeline_model_parallel_size or par.decoder_first_pipeline_num_layers or \
                par.decoder_last_pipeline_num_layers:
            raise ConfigError("checkpoint.ckpt_format = 'torch' is written for evenly split pipeline stages without "
                              "virtual stages: use ckpt_format = torch_dist with virtual or uneven stages")
    heads, groups = m.num_attention_heads, m.num_query_groups
    if m.group_query_attention is False and groups is not None and heads is not None and groups != heads:
        raise ConfigError(f"model.group_query_attention = false means one KV head per query head, but "
                          f"num_query_groups = {groups} and num_attention_heads = {heads}: drop one of them")


SELF_COGNITION = ("swift/self-cognition", "self_cognition", "self-cognition")


def _self_cognition(cfg: JobConfig) -> None:
    """The self-cognition set's rows hold {{NAME}} and {{AUTHOR}}: both names must be given."""
    for ds in cfg.data.dataset + cfg.data.val_dataset:
        path = ds.split("#")[0].rstrip("/")
        base = path.rsplit("/", 1)[-1]
        if path == SELF_COGNITION[0] or base.startswith(SELF_COGNITION[1:]):
            for key in ("model_name", "model_author"):
                if not getattr(cfg.data, key):
                    raise ConfigError(f"data.dataset {ds!r} is a self-cognition set, whose rows need {key}: "
                                      f"pass --{key} (one value, or two: Chinese English), e.g. "
                                      f"--model_name swift-robot --model_author swift")


EXPORT_ONLY = ("to_mcore", "to_hf", "mcore_model", "output_dir", "test_convert_precision", "merge_lora")


def _for_command(cfg: JobConfig, mode: str | None) -> None:
    """[export] keys belong to `hpctrain export`: in sft/pt they would do nothing, so refuse them there."""
    if mode not in TRAIN_MODES:
        return
    for key in EXPORT_ONLY:
        value = getattr(cfg.export, key)
        if value not in (None, False):
            raise ConfigError(f"export.{key} = {value!r} is an option of `hpctrain export` (conversion), which "
                              f"`hpctrain {mode}` does not do: checkpoints go to --save; remove it")


def _lora(cfg: JobConfig) -> None:
    """[tuner]: LoRA keys only with train_type lora; ranges, targets (model/lora/settings.py)."""
    from hpctrain.model.lora.settings import check_tuner

    check_tuner(cfg.tuner)
    t = cfg.tuner
    if len(t.adapters) > 1:
        raise ConfigError(f"tuner.adapters = {t.adapters}: one adapter folder at a time is supported")
    if cfg.checkpoint.ckpt_format == "torch" and (t.train_type == "lora" or cfg.checkpoint.save_safetensors):
        what = "train_type lora" if t.train_type == "lora" else "save_safetensors"
        raise ConfigError(f"{what} needs ckpt_format = 'torch_dist' (the legacy torch format holds no adapters "
                          "and is not read by the HF export); set ckpt_format = 'torch_dist'")
    if t.train_type == "lora" and cfg.model.transformer_impl == "transformer_engine":
        raise ConfigError("train_type lora runs on megatron-core's own tensor-parallel linears (the portable "
                          "spec), not Transformer Engine's: set transformer_impl = 'local'")


def _profile(cfg: JobConfig) -> None:
    t = cfg.train
    if t.profile and not 1 <= t.profile_step_start <= t.profile_step_end:
        raise ConfigError(f"train.profile_step_start = {t.profile_step_start}, profile_step_end = "
                          f"{t.profile_step_end}: need 1 <= start <= end")


def _cuda_graphs(cfg: JobConfig) -> None:
    """What a replayed whole-step CUDA graph needs (train/cuda_graph.py); the CUDA device itself is
    checked when training starts (configs are also validated on login nodes without GPUs)."""
    t, p, m = cfg.train, cfg.parallel, cfg.model
    if t.cuda_graph_impl == "none":
        return
    problems = []
    if p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size > 1:
        problems.append("it is built for one GPU without model parallelism: set tensor/pipeline/context "
                        "_model_parallel_size = 1")
    if (m.hidden_dropout or 0) > 0 or (m.attention_dropout or 0) > 0:
        problems.append("a replay repeats the captured dropout masks: set hidden_dropout = 0 and "
                        "attention_dropout = 0")
    if cfg.tuner.train_type == "lora":
        problems.append("it is not built for train_type lora (the replayed step is that of full training, "
                        "tested on GPUs only there): set cuda_graph_impl = 'none'")
    if cfg.precision.fp16:
        problems.append("fp16's loss scale changes outside the graph: use bf16")
    if t.recompute_granularity == "full" or (t.recompute_granularity == "selective" and
                                             set(t.recompute_modules) - {"core_attn"}):
        problems.append("recompute other than selective core_attn frees and refills memory from hooks "
                        "the graph cannot replay: use recompute_granularity = 'selective' with "
                        "recompute_modules = ['core_attn']")
    if problems:
        raise ConfigError("train.cuda_graph_impl = 'local' cannot be used here: " + "; ".join(problems))


def validate(cfg: JobConfig, mode: str | None = None) -> JobConfig:
    """Raise ConfigError for the first problem found; return cfg when it is consistent.

    ``mode``: the subcommand reading the config, for the checks that depend on it (None: skip them)."""
    _check_fields(cfg)
    check_value_refusals(cfg)
    _positive(cfg)
    _recompute(cfg)
    _cuda_graphs(cfg)
    _profile(cfg)
    _parallel(cfg)
    _training(cfg)
    _schedule(cfg)
    _checkpoint_and_model(cfg)
    _self_cognition(cfg)
    _lora(cfg)
    _for_command(cfg, mode)
    _export_and_slurm(cfg)
    return cfg
