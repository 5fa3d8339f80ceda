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


def _option(cfg_or_kwargs: Any, section: str, name: str, default: Any) -> Any:
    if cfg_or_kwargs is None:
        return default
    if isinstance(cfg_or_kwargs, Mapping):
        return cfg_or_kwargs.get(name, default)
    sec = getattr(cfg_or_kwargs, section, None)
    return getattr(sec, name, default) if sec is not None else default


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

    ``cfg_or_kwargs`` is a JobConfig (reads parallel.distributed_backend, parallel.distributed_timeout_minutes)
    or a dict with optional keys device ("auto"|"cpu"|"cuda"), distributed_backend, distributed_timeout_minutes.
    """
    env = rank_env()
    device_req = _option(cfg_or_kwargs, "train", "device", None) or \
        os.environ.get("HPCTRAIN_DEVICE", "auto")
    device = pick_device(device_req, env["local_rank"])
    compat.apply(device.type)
    backend = _option(cfg_or_kwargs, "parallel", "distributed_backend", None)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and backend != "gloo":
        raise ValueError(f"distributed_backend={backend!r} cannot run on CPU; use 'gloo'")
    minutes = int(_option(cfg_or_kwargs, "parallel", "distributed_timeout_minutes", 10) or 10)
    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env["master_addr"])
        os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
        tdist.init_process_group(
            backend=backend, rank=env["rank"], world_size=env["world_size"],
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            timeout=datetime.timedelta(minutes=minutes))
    return DistInfo(env["rank"], env["world_size"], env["local_rank"], device, env["source"])


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                        ep: int = 1, seed: int | None = 42, timeout_minutes: int = 10,
                        data_parallel_random_init: bool = False) -> int:
    """megatron-core parallel groups + seeds; returns the data-parallel size."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = tdist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp({tp}) * pp({pp}) * cp({cp}) "
                         f"= {tp * pp * cp}; change the parallel sizes or the number of processes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        expert_model_parallel_size=ep, distributed_timeout_minutes=timeout_minutes)
    if seed is not None:
        set_seed(seed, data_parallel_random_init)
    return ps.get_data_parallel_world_size()


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
