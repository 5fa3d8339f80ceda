"""Processes the trainer forks die with it.

megatron-core writes a checkpoint through processes it forks (one per write bucket) and waits for
them; DataLoader workers are forked too. If the trainer is killed (kill -9, OOM killer, a node
agent), such a child keeps running and then blocks forever on a queue nobody reads. After
``die_with_parent()``, every child forked from the trainer's main thread asks the kernel for
SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), and exits at once if the parent is
already gone. Children forked from other threads are left alone: the kernel would kill them when
that thread (not the process) ends. ``subprocess`` children are not affected (they are exec'd
without Python's fork hooks).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_fork = {"parent": 0, "main_thread": False}
_installed = False


def _before_fork() -> None:
    _fork["parent"] = os.getpid()
    _fork["main_thread"] = threading.current_thread() is threading.main_thread()


def _in_child() -> None:
    if not _fork["main_thread"]:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except OSError:
        return
    if os.getppid() != _fork["parent"]:  # the parent died before prctl took effect
        os._exit(1)


def die_with_parent() -> None:
    """Install the fork hooks in this process (idempotent; Linux only, a no-op elsewhere)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
    _installed = True
