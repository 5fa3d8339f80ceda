"""The callable each Slurm task runs (pickled by submitit), with save-and-requeue.

One task per GPU (launcher "srun"): each task runs the program once with RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT derived from Slurm (hpctrain.launch.env); MASTER_ADDR is the
job's first node, resolved to its address on the node. One task per node
(launcher "torchrun"): each task runs ``torchrun --nnodes N --nproc-per-node G --node-rank i``.

Requeue protocol. The job asks Slurm for ``--signal=<SIG>@<signal_before_s>`` (SIG = USR1 by
default; submitit listens for it through SUBMITIT_PREEMPT_SIGNAL). Slurm delivers the signal to
every process of the step, so the trainer gets it directly: it finishes its step, saves and exits
with REQUEUE_EXIT_CODE. The program runs with that signal IGNORED by default (the trainer installs
its own handler), so torchrun -- which does not forward SIGUSR1/2 -- survives it. On rank 0
submitit calls ``checkpoint()``: it waits for the program to exit (the save is complete) and
returns a DelayedSubmission of a copy of this task that resumes from the newest checkpoint under
``save_dir``; submitit then requeues the job (up to max_requeue times).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit

from hpctrain.launch.env import derive_dist_env, torch_env

DEFAULT_REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL; used only when hpctrain.train.signals is absent


def requeue_exit_code() -> int:
    try:
        from hpctrain.train.signals import REQUEUE_EXIT_CODE
    except ImportError:
        return DEFAULT_REQUEUE_EXIT_CODE
    return int(REQUEUE_EXIT_CODE)


def resolve_host(host: str) -> str:
    """The IPv4 address of ``host`` as this node resolves it (the name itself if it does not resolve)."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def latest_checkpoint(save_dir: str | None) -> Path | None:
    """The newest directory under save_dir (itself included) that holds a tracker file."""
    if not save_dir or not Path(save_dir).is_dir():
        return None
    root = Path(save_dir)
    found = [p.parent for p in [root / "latest_checkpointed_iteration.txt",
                                *root.glob("*/latest_checkpointed_iteration.txt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_overrides(ckpt: Path) -> list[str]:
    """Config flags that continue a run from its checkpoint directory, saving back into it."""
    return ["--load", str(ckpt), "--save", str(ckpt), "--finetune", "false", "--add_version", "false"]


@dataclass
class TrainTask(submitit.helpers.Checkpointable):
    """Run ``program`` (argv list) on every Slurm task; requeue-aware. Picklable."""

    program: list[str]
    launcher: str = "srun"
    gpus_per_node: int = 1
    save_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    requeue_signal: str = "USR1"
    resume_args: list[str] = field(default_factory=list)
    requeues: int = 0
    max_requeue: int = 3

    def command(self, dist: dict) -> list[str]:
        argv = list(self.program) + list(self.resume_args)
        if self.launcher != "torchrun":
            return argv
        if argv[:2] == [sys.executable, "-m"] or (len(argv) > 1 and argv[1] == "-m"):
            target = ["-m", argv[2], *argv[3:]]
        else:
            target = argv[1:] if argv and argv[0].endswith(("python", "python3")) else argv
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={dist['nnodes']}",
                f"--nproc-per-node={self.gpus_per_node}", f"--node-rank={dist['node_rank']}",
                f"--master-addr={dist['master_addr']}", f"--master-port={dist['master_port']}", *target]

    def child_env(self, dist: dict) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if self.launcher != "torchrun":
            env.update(torch_env(dist))
        env["HPCTRAIN_REQUEUES"] = str(self.requeues)
        return env

    def __call__(self) -> int:
        dist = derive_dist_env(os.environ)
        dist["master_addr"] = resolve_host(dist["master_addr"])
        # One line per task in the job log: where each rank runs and whom it rendezvouses with.
        print(f"[hpctrain.launch] rank {dist['rank']}/{dist['world_size']} on "
              f"{os.environ.get('SLURMD_NODENAME', socket.gethostname())} ({self.launcher}): "
              f"master {dist['master_addr']}:{dist['master_port']}, requeue {self.requeues}", flush=True)
        sig = getattr(signal, "SIG" + self.requeue_signal)
        # The child inherits SIG_IGN for the requeue signal; a trainer installs its own handler.
        self._proc = subprocess.Popen(self.command(dist), env=self.child_env(dist),
                                      preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
        rc = self._wait()
        if rc == requeue_exit_code():
            # Saved for a requeue. Rank 0's submitit handler requeues the job; others just end.
            if dist["rank"] == 0:
                time.sleep(30)  # the handler is running or about to: let it requeue
            return rc
        if rc != 0:
            raise RuntimeError(f"rank {dist['rank']}: {' '.join(self.command(dist))} exited with {rc}")
        return rc

    def _wait(self) -> int:
        # Poll instead of Popen.wait(): submitit's signal handler runs checkpoint() in this thread,
        # and a wait() nested inside a wait() deadlocks on Popen's internal lock.
        while (rc := self._proc.poll()) is None:
            time.sleep(0.2)
        return rc

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 when the requeue signal arrives: wait for the save, resume later."""
        if getattr(self, "_proc", None) is not None:
            self._wait()  # the program finishes its step and saves
        if self.requeues >= self.max_requeue:
            return None  # submitit then ends the job instead of requeueing it
        ckpt = latest_checkpoint(self.save_dir)
        nxt = replace(self, resume_args=resume_overrides(ckpt) if ckpt else list(self.resume_args),
                      requeues=self.requeues + 1)
        return submitit.helpers.DelayedSubmission(nxt)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_proc", None)
        return state
