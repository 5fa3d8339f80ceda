"""Distributed initialisation: torch.distributed from the launcher's environment, then
megatron-core's model-parallel groups and seeds.

Where the rank comes from, in order:
1. torchrun (or anything that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
2. srun (SLURM_PROCID / SLURM_STEP_NUM_TASKS or SLURM_NTASKS / SLURM_LOCALID); MASTER_ADDR is the
   first host of the step's (or job's) node list unless already set, MASTER_PORT is derived from
   the job id unless already set (hpctrain.launch.env.derive_dist_env does the derivation);
3. nothing: a single process, with a one-rank group on a free local port.
The backend is gloo on CPU and nccl on GPU.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as tdist

from hpctrain.train import compat


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    source: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """rank, world_size, local_rank, master_addr, master_port, source from a launcher env.

    The derivation is hpctrain.launch.env.derive_dist_env's (one for the launcher and the
    trainer); two trainer-side rules on top: a Slurm allocation without a task count (a batch
    shell, not an srun task) is a single process, and a single process without MASTER_PORT takes
    a free local port (a fixed default collides with other jobs on the host)."""
    from hpctrain.launch.env import derive_dist_env

    env = os.environ if env is None else env
    d = derive_dist_env(env)
    if d["source"] == "slurm" and not (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
        d = derive_dist_env({k: v for k, v in env.items() if not k.startswith("SLURM_")})
    if d["source"] == "single" and not env.get("MASTER_PORT"):
        d["master_port"] = _free_port()
    return {k: d[k] for k in ("rank", "world_size", "local_rank", "master_addr", "master_port", "source")}


def group_timeout(parallel: Any) -> datetime.timedelta:
    """The timeout of every process group: ``ddp_timeout`` seconds when set (ms-swift's spelling), else
    ``distributed_timeout_minutes`` (Megatron-LM's; 60 by default, as in the seed)."""
    if parallel.ddp_timeout is not None:
        return datetime.timedelta(seconds=parallel.ddp_timeout)
    return datetime.timedelta(minutes=parallel.distributed_timeout_minutes)


def _options(cfg_or_kwargs: Any) -> tuple[str | None, str | None, datetime.timedelta]:
    """(device, backend, timeout) from a JobConfig, or from a dict with optional keys device,
    distributed_backend and distributed_timeout_minutes (the conversion tools' one-process groups)."""
    if cfg_or_kwargs is None or isinstance(cfg_or_kwargs, Mapping):
        kw = dict(cfg_or_kwargs or {})
        return (kw.get("device"), kw.get("distributed_backend"),
                datetime.timedelta(minutes=kw.get("distributed_timeout_minutes", 60)))
    p = cfg_or_kwargs.parallel
    return None, p.distributed_backend, group_timeout(p)


def pick_device(requested: str, local_rank: int) -> torch.device:
    """"auto" -> cuda when available, else cpu. "cuda" without a GPU is an error."""
    if requested in ("auto", None, ""):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no GPU; use device='cpu'")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested != "cpu":
        raise ValueError(f"device must be auto|cpu|cuda, got {requested!r}")
    return torch.device("cpu")


def init_distributed(cfg_or_kwargs: Any = None) -> DistInfo:
    """Init torch.distributed (idempotent) and apply the compat layer for the chosen device.

    ``cfg_or_kwargs`` is a JobConfig (reads parallel.distributed_backend and the timeout, see group_timeout)
    or a dict with optional keys device ("auto"|"cpu"|"cuda"), distributed_backend, distributed_timeout_minutes.
    """
    env = rank_env()
    device_req, backend, timeout = _options(cfg_or_kwargs)
    device = pick_device(device_req or os.environ.get("HPCTRAIN_DEVICE", "auto"), env["local_rank"])
    compat.apply(device.type)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and backend != "gloo":  # refused at config time for `hpctrain sft/pt` (machine.py)
        raise ValueError(f"distributed_backend={backend!r} cannot run on CPU; use 'gloo'")
    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env["master_addr"])
        os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
        tdist.init_process_group(
            backend=backend, rank=env["rank"], world_size=env["world_size"],
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", timeout=timeout)
    return DistInfo(env["rank"], env["world_size"], env["local_rank"], device, env["source"])


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                        ep: int = 1, seed: int | None = 42, timeout: datetime.timedelta = datetime.timedelta(hours=1),
                        data_parallel_random_init: bool = False, etp: int | None = None) -> int:
    """megatron-core parallel groups + seeds; returns the data-parallel size. Every group megatron-core
    creates gets ``timeout`` (it takes whole minutes: rounded up)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = tdist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp({tp}) * pp({pp}) * cp({cp}) "
                         f"= {tp * pp * cp}; change the parallel sizes or the number of processes")
    etp = etp or tp  # megatron-core's default: experts split like the dense layers
    if world % (etp * ep * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by expert_tensor_parallel({etp}) * "
                         f"expert_model_parallel({ep}) * pp({pp}) = {etp * ep * pp}; change the sizes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, distributed_timeout_minutes=math.ceil(timeout.total_seconds() / 60))
    _every_group_timeout(timeout)
    if seed is not None:
        set_seed(seed, data_parallel_random_init)
    return ps.get_data_parallel_world_size()


def _every_group_timeout(timeout: datetime.timedelta) -> None:
    """Give every process group of this rank ``timeout`` exactly: megatron-core 0.16 takes whole minutes
    and creates EXPERT_DATA_PARALLEL_GROUP_GLOO with none (torch's 30-minute default)."""
    c10d = tdist.distributed_c10d
    for pg in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(pg):
            c10d._set_pg_timeout(timeout, pg)


def set_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Python/numpy/torch seeds (offset per pipeline stage, as Megatron-LM does) + TP RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    s = seed + 100 * ps.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        s += 10 * ps.get_data_parallel_rank()
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


def destroy() -> None:
    """Tear down megatron-core groups and the default process group (safe if not initialised)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
