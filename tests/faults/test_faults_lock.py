"""One run per save folder. Two `sft` runs on one --save both exited 0 (checkpoints, args.json and
logging.jsonl of the first overwritten or interleaved by the second); now the second refuses with
one line naming the first run's host and PID, and a lock left by a killed run is taken over."""
import json
import os
import signal
import socket

import pytest

from faultkit import error_line, hpctrain, save_flags, sft_args, start_trainer, trainer, wait_for
from hpctrain.checkpoint import lock
from hpctrain.errors import UserError


@pytest.mark.slow
def test_second_run_on_one_save_refuses_and_a_killed_runs_lock_is_taken_over(tmp_path):
    save = tmp_path / "save"
    first = start_trainer(*save_flags(save, iters=100000, interval=100000))
    log = save / "logging.jsonl"
    wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 1, proc=first)
    second = trainer(*save_flags(save, iters=2, interval=2))
    assert second.returncode == 2
    line = error_line(second, "sft")
    assert f"--save {save} is in use by another run: host {socket.gethostname()} PID {first.pid}" in line
    assert "delete" in line and lock.LOCK_NAME in line
    assert first.poll() is None  # the first run was not disturbed
    args_before = (save / "args.json").read_text()
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert (save / lock.LOCK_NAME).is_file()  # kill -9: nothing could remove it...
    third = trainer(*save_flags(save, iters=2, interval=2))  # ...but its PID is gone: stale
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (save / lock.LOCK_NAME).exists()  # released at the end of the run
    assert (save / "args.json").read_text() != args_before  # the third run's config


@pytest.mark.slow
def test_lock_released_after_a_stop_signal(tmp_path):
    save = tmp_path / "save"
    run = start_trainer(*save_flags(save, iters=100000, interval=100000))
    wait_for(lambda: (save / "logging.jsonl").is_file(), proc=run)
    assert json.loads((save / lock.LOCK_NAME).read_text())["pid"] == run.pid
    run.send_signal(signal.SIGUSR1)
    run.communicate(timeout=300)
    assert run.returncode == 42 and not (save / lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_two_ranks_refuse_together_when_rank_0_cannot_take_the_lock(tiny_mcore, tmp_path):
    """Rank 0 takes the lock and tells the others: every rank stops, one line for all."""
    save = tmp_path / "save"
    me = os.getpid()  # a live process on this host holds the lock
    write_lock(save, host=socket.gethostname(), pid=me, start=lock.process_start(me))
    p = hpctrain(*sft_args(tiny_mcore[1], save), env={"NPROC_PER_NODE": "2"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"is in use by another run: host {socket.gethostname()} PID {me}" in error_line(p, "sft")
    assert json.loads((save / lock.LOCK_NAME).read_text())["pid"] == me  # not taken, not removed


def write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lock.LOCK_NAME).write_text(json.dumps({"since": "2026-01-01T00:00:00", **holder}))


def test_lock_of_another_host_is_refused_and_says_it_cannot_be_checked(tmp_path):
    write_lock(tmp_path, host="node-elsewhere", pid=4242, start="1", job="77")
    with pytest.raises(UserError, match=r"host node-elsewhere PID 4242, Slurm job 77.*another host, so whether "
                                        r"it still runs cannot be checked"):
        lock.SaveLock(tmp_path).acquire()


def test_requeued_slurm_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node-elsewhere", pid=4242, start="1", job="77", restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held = lock.SaveLock(tmp_path)
    held.acquire()
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    held.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_same_host_live_process_refused_dead_or_reused_pid_taken_over(tmp_path):
    me = os.getpid()
    write_lock(tmp_path, host=socket.gethostname(), pid=me, start=lock.process_start(me))
    with pytest.raises(UserError, match=f"PID {me}"):
        lock.SaveLock(tmp_path).acquire()
    write_lock(tmp_path, host=socket.gethostname(), pid=me, start="0")  # PID reused by another process
    lock.SaveLock(tmp_path).acquire()
    write_lock(tmp_path, host=socket.gethostname(), pid=2 ** 22 + 1, start="5")  # no such process
    lock.SaveLock(tmp_path).acquire()


def test_unreadable_lock_refused_while_young_taken_when_old(tmp_path):
    (tmp_path / lock.LOCK_NAME).write_text("")
    with pytest.raises(UserError, match="cannot be read"):
        lock.SaveLock(tmp_path).acquire()
    old = (tmp_path / lock.LOCK_NAME).stat().st_mtime - 2 * lock.UNREADABLE_GRACE_S
    os.utime(tmp_path / lock.LOCK_NAME, (old, old))
    lock.SaveLock(tmp_path).acquire()
