"""Distributed environment from the launcher's variables: a PURE function of the environment.

    derive_dist_env(os.environ) -> {rank, world_size, local_rank, local_world_size, node_rank,
                                    nnodes, master_addr, master_port, source}

Sources, in order: torchrun (RANK + WORLD_SIZE set), a Slurm task (SLURM_PROCID; one task per
GPU via srun), else a single process. With Slurm, MASTER_ADDR is the first host of the step's
(or job's) node list unless MASTER_ADDR is set, and MASTER_PORT is 20000 + job id % 20000 unless
set, so every task of a job agrees without talking to each other.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in Slurm host list {s!r}")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        r = _RANGE.match(rng.strip())
        if not r:
            raise ValueError(f"bad range {rng!r} in Slurm host list {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{head}{str(n).zfill(width)}{tail}"))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``"gpu[01-03,07],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``."""
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    if value in (None, ""):
        return default
    try:
        return int(str(value).split("(")[0])  # SLURM_TASKS_PER_NODE looks like "2(x3)"
    except ValueError as e:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from e


def slurm_master_port(environ: Mapping[str, str]) -> int:
    return 20000 + _int(environ, "SLURM_JOB_ID", 0) % 20000


def derive_dist_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """rank, world_size, local_rank, master_addr, master_port (+ local_world_size, node_rank, nnodes, source)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE", 1)
        local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
        return dict(rank=_int(environ, "RANK", 0), world_size=world, local_rank=_int(environ, "LOCAL_RANK", 0),
                    local_world_size=local_world, node_rank=_int(environ, "GROUP_RANK", _int(environ, "NODE_RANK", 0)),
                    nnodes=max(1, world // max(1, local_world)),
                    master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=_int(environ, "MASTER_PORT", 29500), source="torchrun")
    if "SLURM_PROCID" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
        hosts = expand_hostlist(nodelist) if nodelist else []
        world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
        nnodes = _int(environ, "SLURM_STEP_NUM_NODES", _int(environ, "SLURM_NNODES", max(1, len(hosts))))
        return dict(rank=_int(environ, "SLURM_PROCID", 0), world_size=world,
                    local_rank=_int(environ, "SLURM_LOCALID", 0),
                    local_world_size=_int(environ, "SLURM_STEP_TASKS_PER_NODE",
                                          _int(environ, "SLURM_NTASKS_PER_NODE", max(1, world // nnodes))),
                    node_rank=_int(environ, "SLURM_NODEID", 0), nnodes=nnodes,
                    master_addr=environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
                    master_port=_int(environ, "MASTER_PORT", slurm_master_port(environ)), source="slurm")
    return dict(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, nnodes=1,
                master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(environ, "MASTER_PORT", 29500), source="single")


def torch_env(dist: Mapping[str, Any]) -> dict[str, str]:
    """The torchrun-style variables a child process reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    return {"RANK": str(dist["rank"]), "WORLD_SIZE": str(dist["world_size"]),
            "LOCAL_RANK": str(dist["local_rank"]), "LOCAL_WORLD_SIZE": str(dist["local_world_size"]),
            "GROUP_RANK": str(dist["node_rank"]), "MASTER_ADDR": str(dist["master_addr"]),
            "MASTER_PORT": str(dist["master_port"])}
