"""Shared by the fault tests: run ``hpctrain`` (or the trainer through fault_worker.py) as a user
would, and read the one error line it prints. (A module of its own name: every test folder has a
conftest.py, so ``from conftest import`` would find whichever was imported first.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "hpctrain" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
WORKER = HERE / "fault_worker.py"


def _env(extra=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_JOB_ID", "NPROC_PER_NODE",
              "HPCTRAIN_DEBUG", "HPCTRAIN_ERROR_DIR", "HPCTRAIN_STATUS_FILE"):
        env.pop(k, None)
    return env


def hpctrain(*args, env=None, timeout=600, cwd=None, preexec_fn=None) -> subprocess.CompletedProcess:
    """``python -m hpctrain ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "hpctrain", *map(str, args)], cwd=cwd or ROOT,
                          env=_env(env), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def start_trainer(*flags, env=None, preexec_fn=None) -> subprocess.Popen:
    """fault_worker.py (``hpctrain sft`` on synthetic data) in its own process group."""
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, flags)], cwd=ROOT, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)


def trainer(*flags, env=None, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    p = start_trainer(*flags, env=env, preexec_fn=preexec_fn)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def save_flags(save, *extra, iters=6, interval=2) -> list:
    # A resume with more --train_iters changes the LR/weight-decay schedule, which is refused unless the
    # run says whose schedule wins (as in Megatron-LM): these tests take the new run's.
    return ["--train_iters", iters, "--override_opt_param_scheduler", "true", "--save", save, "--add_version", "false", "--save_interval", interval, *extra]


def error_line(proc: subprocess.CompletedProcess, command: str = "") -> str:
    """The failure line of a finished command; fails unless there is exactly one and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"hpctrain {command}".rstrip())]
    assert len(lines) == 1, f"expected one error line, got {lines}\n{proc.stderr[-3000:]}"
    return lines[0]


def losses(save: Path) -> dict[int, float]:
    """iteration -> training loss from a run's logging.jsonl."""
    out = {}
    for line in (Path(save) / "logging.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["iteration"]] = rec["loss"]
    return out


def wait_for(pred, proc=None, timeout=300.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def sft_args(load, save, *extra) -> list:
    """`hpctrain sft` on the real bundled data, one process, one iteration."""
    return ["sft", "--load", load, "--finetune", "true", "--dataset", f"{DATA}/self_cognition.jsonl#4",
            "--max_length", "64", "--micro_batch_size", "2", "--global_batch_size", "2", "--train_iters", "1",
            "--lr", "1e-5", "--save", save, "--add_version", "false", "--model_name", "bot",
            "--model_author", "me", *extra]
