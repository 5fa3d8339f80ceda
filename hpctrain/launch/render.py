"""Slurm job parameters and the sbatch script text: PURE functions of (config, plan, folder).

``executor_params`` maps the [slurm] section onto submitit's SlurmExecutor parameters;
``render_script`` is the exact sbatch script submitit will submit (submitit's own pure renderer),
golden-file tested. Every user-supplied value is shell-quoted: submitit quotes ``#SBATCH`` values
and the srun line, and the setup lines we add quote values with shlex.quote. Quoting does not stop a
newline from ending an ``#SBATCH`` comment line (the rest would run as a shell line), so values that
land on one - job_name, partition, account, qos, constraint, mem, time, folder, every extra_sbatch
entry - refuse control characters (newline, CR, NUL, the other C0 controls, DEL), naming the key.
``setup`` lines are shell code by design and env values are quoted, so those only refuse NUL.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string

from hpctrain.errors import UserError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte", "\t": "a tab"}
LINE_KEYS = ("job_name", "partition", "account", "qos", "constraint", "mem", "time", "folder")
# Variables forwarded from the submitting shell into the job (NCCL tuning, debugging).
PASSTHROUGH_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "NVSHMEM_", "TORCH_SYMM_MEM_")


def check_value(key: str, value: Any, only_nul: bool = False) -> None:
    """Refuse a control character in [slurm] ``key``'s value (only NUL where ``only_nul``)."""
    text = str(value)
    m = re.search("\x00", text) if only_nul else _CONTROL.search(text)
    if m:
        what = _CONTROL_NAMES.get(m.group(), f"the control character U+{ord(m.group()):04X}")
        why = ("a shell script cannot carry it; remove it" if only_nul else
               "a newline would end the #SBATCH line and start a shell command; write the value on one "
               "line of printable text")
        raise UserError(f"[slurm] {key} = {text!r} contains {what}: {why}")


def parse_time_minutes(value: str | int | None) -> int | None:
    """Slurm time ("MM", "HH:MM:SS", "D-HH:MM[:SS]", "MM:SS") -> whole minutes (rounded up)."""
    if value is None:
        return None
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"[slurm] time = {value!r} is not a Slurm time (use 'HH:MM:SS', 'D-HH:MM:SS' or minutes)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is None and b is None:
        return a                                    # "MM"
    if days is None and c is None:
        return a + (1 if b else 0)                  # "MM:SS"
    hours, minutes, seconds = a, b or 0, c or 0     # "HH:MM[:SS]" / "D-HH[:MM[:SS]]"
    return (days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def extra_sbatch_params(lines: Sequence[str]) -> dict[str, Any]:
    """["--reservation=x", "--requeue", "--mail-type END"] -> {"reservation": "x", "requeue": True, ...}."""
    out: dict[str, Any] = {}
    for raw in lines:
        check_value("extra_sbatch entry", raw)
        text = raw.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        key, sep, value = text.lstrip("-").replace(" ", "=", 1).partition("=")
        key = key.strip().replace("_", "-")
        if not text.startswith("--") or not _SBATCH_KEY.match(key):
            raise ValueError(f"[slurm] extra_sbatch entry {raw!r}: write long options like '--reservation=NAME'")
        out[key] = value if sep else True
    return out


def setup_lines(slurm: Any, requeue_signal: str, environ: Mapping[str, str] = {}) -> list[str]:
    """Shell lines run in the batch script before srun: exports (quoted), then the user's setup commands."""
    lines = [f"export SUBMITIT_PREEMPT_SIGNAL={requeue_signal}"]
    for key in sorted(environ):
        if key.startswith(PASSTHROUGH_PREFIXES) and key not in slurm.env:
            lines.append(f"export {key}={shlex.quote(environ[key])}")
    for key, value in slurm.env.items():
        if not _ENV_NAME.match(str(key)):
            raise ValueError(f"[slurm] env key {key!r} is not a valid environment variable name")
        check_value(f"env.{key}", value, only_nul=True)
        lines.append(f"export {key}={shlex.quote(str(value))}")
    # The user's setup commands are shell code by design (e.g. 'module load cuda/12.4').
    for cmd in slurm.setup:
        check_value("setup entry", cmd, only_nul=True)
    return lines + [str(cmd) for cmd in slurm.setup]


def executor_params(slurm: Any, nodes: int, gpus_per_node: int, launcher: str = "srun", use_gpus: bool = True,
                    requeue_signal: str = "USR1", environ: Mapping[str, str] = {}) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a job of ``nodes`` x ``gpus_per_node`` processes."""
    for key in LINE_KEYS:
        if getattr(slurm, key, None) is not None:
            check_value(key, getattr(slurm, key))
    tasks = 1 if launcher == "torchrun" else gpus_per_node
    params: dict[str, Any] = {
        "job_name": slurm.job_name, "nodes": nodes, "ntasks_per_node": tasks,
        "setup": setup_lines(slurm, requeue_signal, environ),
    }
    if use_gpus and gpus_per_node > 0:
        params["gpus_per_node"] = gpus_per_node
    minutes = parse_time_minutes(slurm.time)
    if minutes is not None:
        params["time"] = minutes
    for name in ("partition", "account", "qos", "constraint", "mem", "cpus_per_task"):
        value = getattr(slurm, name)
        if value is not None:
            params[name] = value
    if slurm.exclusive:
        params["exclusive"] = True
    extra = {"signal": f"{requeue_signal}@{slurm.signal_before_s}", "requeue": True}
    extra.update(extra_sbatch_params(slurm.extra_sbatch))
    params["additional_parameters"] = extra
    return params


def submitit_command(python: str, folder: str) -> str:
    """What submitit's SlurmExecutor puts after srun (it unpickles and runs the job from ``folder``)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_script(params: Mapping[str, Any], folder: str, python: str) -> str:
    """The sbatch script text for these executor parameters (pure; what --dry-run prints)."""
    return sbatch_text(submitit_command(python, folder), folder, params)


def sbatch_text(command: str, folder: str, params: Mapping[str, Any]) -> str:
    """submitit's renderer, except that a missing "time" means no --time line (the partition's default)
    instead of submitit's 5-minute default."""
    kwargs = dict(params)
    kwargs.setdefault("time", None)
    return _make_sbatch_string(command=command, folder=folder, **kwargs)
