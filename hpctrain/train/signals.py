"""Graceful stop on SIGTERM / SIGUSR1: finish the current step, save, exit with REQUEUE_EXIT_CODE.

REQUEUE_EXIT_CODE (42) means "stopped cleanly on request, checkpoint saved: requeue me" to the
Slurm layer (hpctrain.launch). Slurm sends the signal before the time limit (``--signal``) or on
preemption. Every rank installs the handler; ranks agree on stopping with an all-reduce after each
step, because a signal may reach only some of them (e.g. only the batch shell's children).
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as tdist

REQUEUE_EXIT_CODE = 42
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; ``should_stop()`` is collective (call it on every rank each step)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            if tdist.get_backend() == "nccl":
                flag = flag.cuda()
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
