"""Real jobs on the local Slurm cluster (tools/slurm): submitit, `hpctrain submit`, requeue."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKLOAD = HERE / "counter_train.py"
ITERS = 12
JOB_TOML = """
[model]
num_layers = 2
hidden_size = 8
num_attention_heads = 2
padded_vocab_size = 16
[train]
micro_batch_size = 1
global_batch_size = 4
train_iters = {iters}
lr = 0.1
[checkpoint]
save = "{save}"
save_interval = 5
[slurm]
job_name = "{name}"
folder = "{folder}"
gpus_per_node = 2
time = "00:20:00"
signal_before_s = 30
max_requeue = 2
[slurm.env]
COUNTER_STEP_S = "0.4"
"""


def _wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f} s")


def _job_gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode != 0 or not out.stdout.strip()


def _submit(tmp: Path, name: str, *extra: str) -> tuple[str, Path, subprocess.CompletedProcess]:
    save = tmp / "ckpt"
    cfg = tmp / "job.toml"
    cfg.write_text(JOB_TOML.format(iters=ITERS, save=save, name=name, folder=tmp / "jobs"))
    proc = subprocess.run([sys.executable, "-m", "hpctrain.cli", "submit", "--nodes", "2", str(cfg), "--cpu",
                           "--program", str(WORKLOAD), *extra], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, save, proc


def _final(save: Path, job_id: str, logs: Path) -> dict:
    path = save / "final.json"
    try:
        _wait_until(lambda: path.is_file() and _job_gone(job_id), 600, f"job {job_id} to finish")
    except AssertionError:
        texts = "\n".join(f"== {p}\n" + p.read_text()[-3000:] for p in sorted(logs.rglob("*.out")))
        job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        raise AssertionError(f"job {job_id} did not finish; logs:\n{texts}\n{job}")
    return json.loads(path.read_text())


def test_submitit_function_job_returns(slurm_cluster, tmp_path):
    import submitit

    folder = tmp_path / "fn jobs; $(x)"
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_job_name="fn 'q'", timeout_min=5, nodes=1, tasks_per_node=1)
    job = ex.submit(sum, [1, 2, 3])
    assert job.result() == 6
    name = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "JobName=fn 'q'" in name or name == ""  # the record may already be purged


def test_impossible_request_fails_fast_with_clear_message(slurm_cluster, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text(JOB_TOML.format(iters=ITERS, save=tmp_path / "ckpt", name="too-big", folder=tmp_path / "jobs"))
    proc = subprocess.run([sys.executable, "-m", "hpctrain.cli", "submit", "--nodes", "5", str(cfg), "--cpu",
                           "--program", str(WORKLOAD), "--global_batch_size", "20"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "Slurm refused the job" in proc.stderr and "Node count specification invalid" in proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    job_id, save, proc = _submit(tmp, "straight; $(echo x) 'run'")
    assert "TP=1 PP=1 CP=1 DP=4 on 4 GPUs (2 nodes x 2)" in proc.stdout  # the plan is printed
    assert "stdout:" in proc.stdout and "stderr:" in proc.stdout
    return job_id, save, _final(save, job_id, tmp / "jobs"), tmp


def test_submit_2_nodes_x_2_tasks_trains_and_checkpoints(uninterrupted):
    job_id, save, final, tmp = uninterrupted
    assert final["world_size"] == 4 and final["iteration"] == ITERS and final["requeues"] == 0
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert sorted(p.name for p in (save / f"iter_{ITERS:07d}").iterdir()) == [f"rank_{r}.pt" for r in range(4)]
    log = next((tmp / "jobs").rglob(f"{job_id}_0_log.out")).read_text()
    # MASTER_ADDR = the first node (n1), resolved inside the job (its hosts file maps n1 to 127.0.0.1)
    assert "rank 0/4" in log and "master 127.0.0.1:" in log


def test_preemption_saves_requeues_and_finishes_with_same_loss(uninterrupted, tmp_path):
    """One torchrun per node this time (the uninterrupted reference ran one srun task per GPU)."""
    _, _, reference, _ = uninterrupted
    job_id, save, _ = _submit(tmp_path, "preempted", "--launcher", "torchrun")
    log = lambda: next((tmp_path / "jobs").rglob(f"{job_id}_0_log.out"), None)  # noqa: E731
    _wait_until(lambda: log() is not None and "iter 3 " in log().read_text(), 400, "iteration 3")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    final = _final(save, job_id, tmp_path / "jobs")
    text = log().read_text()
    assert "saved at iteration" in text and "Requeued job" in text
    assert final["requeues"] == 1 and 3 <= final["resumed_from"] < ITERS
    assert final["iteration"] == ITERS
    assert final["loss"] == pytest.approx(reference["loss"], rel=0, abs=1e-12)


def test_plain_sbatch_template_requeues_and_resumes(uninterrupted, tmp_path):
    """slurm/train.sbatch submitted with plain sbatch: signal -> save -> scontrol requeue -> resume."""
    _, _, reference, _ = uninterrupted
    cfg = tmp_path / "job.toml"
    save = tmp_path / "ckpt"
    cfg.write_text(JOB_TOML.format(iters=ITERS, save=save, name="plain", folder=tmp_path / "jobs"))
    out = tmp_path / "plain-%j.out"
    env = dict(os.environ, CONFIG=str(cfg), PROGRAM=str(WORKLOAD), PYTHON=sys.executable, MAX_REQUEUE="2",
               COUNTER_STEP_S="0.4")
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                          "--cpus-per-task=1", f"--output={out}", "--time=20", str(ROOT / "slurm" / "train.sbatch")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log = tmp_path / f"plain-{job_id}.out"
    _wait_until(lambda: log.is_file() and "iter 3 " in log.read_text(), 400, "iteration 3")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    final = _final(save, job_id, tmp_path)
    text = log.read_text()
    assert "requeueing job" in text and "restart 1" in text and "--load" in text
    assert final["iteration"] == ITERS and 3 <= final["resumed_from"] < ITERS
    assert final["loss"] == pytest.approx(reference["loss"], rel=0, abs=1e-12)
