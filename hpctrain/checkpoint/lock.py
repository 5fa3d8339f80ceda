"""One training run per save folder: a lock file that rank 0 holds for the whole run.

Two runs writing one ``--save`` overwrite each other's checkpoints, args.json and logs. The first run
creates ``<save>/.hpctrain.lock`` (O_EXCL) holding its host, PID, process start time and Slurm job;
a second run finds it and refuses, naming that host and PID. The lock is removed when the run ends
(normally, on an error, or after a stop signal). A lock left by a run that was killed (kill -9, node
crash) is stale and taken over when this can be told for sure:

* same host: the PID no longer runs, or runs a different process (its start time differs);
* the same Slurm job, requeued (SLURM_JOB_ID equal, SLURM_RESTART_COUNT different): the previous
  incarnation is gone by the time Slurm starts the next.

A lock from another host (outside a requeue of the same job) cannot be checked from here: the
refusal says so, and the user deletes the file once they know that run is gone. An unreadable lock
file (killed between creating and writing it) counts as stale after a minute.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

from hpctrain.errors import UserError

LOCK_NAME = ".hpctrain.lock"
UNREADABLE_GRACE_S = 60.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "job": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _stale(holder: dict) -> bool:
    me = _me()
    if holder.get("job") and holder.get("job") == me["job"] and holder.get("restart") != me["restart"]:
        return True  # an earlier incarnation of this requeued Slurm job
    if holder.get("host") != me["host"]:
        return False
    pid = int(holder.get("pid", -1))
    if not pid_alive(pid):
        return True
    return holder.get("start") is not None and process_start(pid) not in (None, holder.get("start"))


class SaveLock:
    """``acquire()`` / ``release()`` the lock of save folder ``folder`` (rank 0 only)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this instant, or left half-written: see _abandoned

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile: try again
                if not (_stale(holder) if holder else self._abandoned()):
                    raise UserError(self._refusal(holder))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the save-folder lock (another run keeps taking it)")

    def _abandoned(self) -> bool:
        """An unreadable lock file (a run killed between creating and writing it) older than a minute."""
        try:
            return time.time() - self.path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True

    def _refusal(self, holder: dict) -> str:
        if not holder:
            return (f"{self.path} exists but cannot be read: another run may be starting on --save "
                    f"{self.folder}; retry, use another --save, or delete the file if no run uses the folder")
        job = f", Slurm job {holder['job']}" if holder.get("job") else ""
        here = holder.get("host") == socket.gethostname()
        check = ("it is still running" if here else
                 "it runs on another host, so whether it still runs cannot be checked from here")
        return (f"--save {self.folder} is in use by another run: host {holder.get('host')} PID "
                f"{holder.get('pid')}{job}, since {holder.get('since')} ({check}); wait for it to finish, "
                f"choose another --save, or delete {self.path} once that run is gone")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
