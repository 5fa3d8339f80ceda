"""Crash and signal handling of the trainer (single process, gloo, tiny model).

* kill -9 during a save: the tracker still names the previous checkpoint, the half-written
  iter dir is never loaded, and the resumed run continues exactly like an uninterrupted one.
* SIGUSR1: the run finishes its step, saves, exits with REQUEUE_EXIT_CODE; the checkpoint is complete.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpctrain.checkpoint import layout
from hpctrain.train.signals import REQUEUE_EXIT_CODE

HERE = Path(__file__).resolve().parent
WORKER = HERE / "trainer_worker.py"
ROOT = HERE.parents[1]

pytestmark = pytest.mark.slow


def start(tmp: Path, name: str, jobs: list, env=None) -> tuple[subprocess.Popen, Path]:
    plan, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    plan.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        e.pop(k, None)
    p = subprocess.Popen([sys.executable, str(WORKER), str(plan)], cwd=ROOT, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # own process group: kill -9 reaches its helpers too
    return p, out


def finish(p: subprocess.Popen, out: Path, expect_rc: int = 0) -> dict:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == expect_rc, f"rc {p.returncode}\n{stdout[-2000:]}\n{stderr[-5000:]}"
    return json.loads(out.read_text())


def wait_for(pred, timeout=300.0, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def flags(init, save, *extra):
    return ["--load", str(init), "--finetune", "true", "--train_iters", "6", "--save", str(save),
            "--add_version", "false", "--save_interval", "2", *extra]


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    init = tmp / "init"
    p, out = start(tmp, "init", [
        {"name": "init", "init_only": True, "flags": ["--save", str(init), "--add_version", "false"]},
        {"name": "straight", "flags": flags(init, tmp / "straight")}])
    res = finish(p, out)
    return tmp, init, res["straight"]


def test_kill9_during_save_resumes_from_previous(init_ckpt):
    tmp, init, straight = init_ckpt
    save = tmp / "crash"
    # The fault hook holds every save open for 2 s after its files are written, before the tracker:
    # we kill -9 inside that window of the iteration-4 save.
    p, _ = start(tmp, "crash", [{"name": "crash", "flags": flags(init, save)}],
                 env={"HPCTRAIN_FAULT_PAUSE_BEFORE_TRACKER": "2"})
    wait_for(lambda: (save / "iter_0000004").is_dir(), proc=p)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)  # the trainer and its checkpoint-writer helpers
    p.communicate(timeout=60)
    assert layout.read_tracker(save) == (2, False)
    assert (save / "iter_0000004").is_dir()  # half-finished save left behind...
    assert layout.find_latest(save).iteration == 2  # ...and never picked up
    # Resume (not finetune) from the same directory; the stale iter_0000004 is replaced.
    p, out = start(tmp, "resume", [{"name": "resume", "flags": [
        "--load", str(save), "--train_iters", "6", "--save", str(save), "--add_version", "false",
        "--save_interval", "2"]}])
    res = finish(p, out)["resume"]
    assert res["iteration"] == 6
    assert res["losses"] == straight["losses"][2:]  # bitwise on CPU
    assert layout.read_tracker(save) == (6, False)
    assert layout.find_latest(save).iteration == 6


def test_sigusr1_saves_and_exits_with_requeue_code(init_ckpt):
    tmp, init, _ = init_ckpt
    save = tmp / "sig"
    p, out = start(tmp, "sig", [{"name": "sig", "flags": [
        "--load", str(init), "--finetune", "true", "--train_iters", "100000", "--save", str(save),
        "--add_version", "false", "--save_interval", "100000"]}])
    log = save / "logging.jsonl"
    wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, proc=p)
    p.send_signal(signal.SIGUSR1)
    res = finish(p, out, expect_rc=REQUEUE_EXIT_CODE)["sig"]
    assert res["exit_code"] == REQUEUE_EXIT_CODE
    assert 2 <= res["iteration"] < 100000
    ref = layout.find_latest(save)
    assert ref is not None and ref.iteration == res["iteration"]
