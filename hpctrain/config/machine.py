"""Refusals made where the trainer starts: what is installed (Transformer Engine, apex, CUDA), how many
processes the launch gives (TP x PP x CP must fit the world size), and how long to train.

load_config(..., on_this_machine=True) runs them; only the trainer's entry point asks for that, since
`hpctrain plan` / `submit` / `prep` read the same config on a login node that lacks the GPUs and
packages of the cluster. Each check reads nothing but the config, the environment and importlib's
module finder (torch is imported only when a check needs CUDA's presence).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from hpctrain.config.errors import ConfigError
from hpctrain.config.job import JobConfig

TE_HINT = ("install Transformer Engine (pip install --no-build-isolation 'transformer_engine[pytorch]', "
           "see NVIDIA's install guide) or set transformer_impl = local (hpctrain's portable layers)")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def world_size(cfg: JobConfig, environ: Mapping[str, str]) -> int:
    """Processes this training run will have: the launcher's (torchrun / srun task count) when this
    process is one of its ranks, else NPROC_PER_NODE x NNODES (hpctrain starts torchrun itself), else 1."""
    from hpctrain.launch.env import derive_dist_env

    d = derive_dist_env(environ)
    if d["source"] == "torchrun" or (d["source"] == "slurm" and d["world_size"] > 1):
        return d["world_size"]
    nproc = cfg.launch.nproc_per_node or 1
    return nproc * (cfg.launch.nnodes or 1) if nproc > 1 else 1


def _layout(cfg: JobConfig, world: int) -> None:
    p, t = cfg.parallel, cfg.train
    need = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    formula = (f"tp({p.tensor_model_parallel_size}) * pp({p.pipeline_model_parallel_size}) * "
               f"cp({p.context_parallel_size}) = {need}")
    if world % need:
        raise ConfigError(f"{formula} does not divide the {world} process(es) of this run: launch a multiple "
                          f"of {need} processes (NPROC_PER_NODE, torchrun --nproc_per_node, srun tasks) or "
                          "change the parallel sizes")
    ep = cfg.moe.expert_model_parallel_size
    etp = cfg.moe.expert_tensor_parallel_size or p.tensor_model_parallel_size
    expert = etp * ep * p.pipeline_model_parallel_size
    if ep * etp > 1 and world % expert:
        raise ConfigError(f"expert_tensor_parallel({etp}) * expert_model_parallel({ep}) * pp("
                          f"{p.pipeline_model_parallel_size}) = {expert} does not divide the {world} process(es) of "
                          "this run: the experts of each pipeline stage are split over ETP x EP ranks; change "
                          "the sizes or the number of processes")
    dp = world // need
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({dp} = {world} processes / {need})")


def _backend(cfg: JobConfig, environ: Mapping[str, str]) -> None:
    if cfg.parallel.distributed_backend != "nccl":
        return
    device = environ.get("HPCTRAIN_DEVICE", "auto")
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise ConfigError("parallel.distributed_backend = 'nccl' needs CUDA GPUs, and this machine has none "
                          f"visible{' (HPCTRAIN_DEVICE=cpu)' if device == 'cpu' else ''}: set distributed_backend "
                          "= gloo, or leave it unset (nccl on GPUs, gloo on CPU)")


def _packages(cfg: JobConfig) -> None:
    te = _have("transformer_engine")
    if cfg.model.transformer_impl == "transformer_engine" and not te:
        raise ConfigError(f"model.transformer_impl = 'transformer_engine' but Transformer Engine is not "
                          f"installed here: {TE_HINT}")
    t = cfg.train
    if t.cross_entropy_loss_fusion and t.cross_entropy_fusion_impl == "te" and not te:
        raise ConfigError("train.cross_entropy_fusion_impl = 'te' needs Transformer Engine, which is not installed "
                          "here: use cross_entropy_fusion_impl = native (hpctrain's chunked cross entropy)")
    if cfg.optim.optimizer == "sgd" and cfg.parallel.use_distributed_optimizer and not (te or _have("apex")):
        raise ConfigError("optim.optimizer = 'sgd' with parallel.use_distributed_optimizer = true needs apex or "
                          "Transformer Engine (megatron-core 0.16's distributed optimizer reads Adam's state "
                          "without them): set use_distributed_optimizer = false, or use adam")


def check_machine(cfg: JobConfig, environ: Mapping[str, str]) -> None:
    """Raise ConfigError for what this machine / this launch cannot run."""
    if not (cfg.train.train_iters or cfg.train.max_epochs):
        raise ConfigError("neither train.train_iters nor train.max_epochs is set: say how long to train, e.g. "
                          "--train_iters 100 or --max_epochs 1")
    _packages(cfg)
    _backend(cfg, environ)
    _layout(cfg, world_size(cfg, environ))
