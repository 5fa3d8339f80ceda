"""Real training jobs on the local Slurm cluster (tools/slurm): `hpctrain submit`, requeue, plain sbatch.

Every job runs the real trainer (`hpctrain sft`, megatron-core on gloo/CPU) on the bundled
self-cognition set and a tiny Qwen2-shaped model (2 layers, hidden 32, vocabulary 320: a byte-level
tokenizer carrying the Qwen2.5 chat template), TP=2 x DP=2 over 2 fake nodes x 2 tasks, 40
iterations (two passes over the 73 samples that fit max_length 256), a checkpoint every 15 and at
the end. Three jobs run side by side (the cluster has 4 nodes of 8 CPUs; their start-up and requeue
waits overlap):

* straight:  `hpctrain submit --nodes 2`, one srun task per rank, never interrupted (the reference);
* preempted: `hpctrain submit --nodes 2 --launcher torchrun`; `scancel --signal=USR1` once the log
  shows iteration 2 -> the trainer saves and exits 42, submitit requeues, the job resumes;
* plain:     slurm/train.sbatch with plain sbatch, same signal -> `scontrol requeue` -> resume.

Same layout, seeds, data order and one thread per process: a resumed run must reproduce the
reference's loss at EVERY iteration bitwise (tolerance 0), read from logging.jsonl (full floats).
"""
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpctrain.checkpoint import layout

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "hpctrain" / "assets" / "data" / "self_cognition.jsonl"
# A step takes ~0.1-0.5 s: the 38 steps (and 2 saves) between the signal and the end leave seconds for
# scancel to land mid-run; where it lands does not change the result.
ITERS, SIGNAL_AT, SAVE_INTERVAL = 40, 2, 15
JOB_TOML = """
[model]
model = {model}
load_safetensors = false
[data]
dataset = [{dataset}]
max_length = 256
num_workers = 0
model_name = ["小机器人", "tiny-robot"]
model_author = ["测试", "hpctrain-tests"]
[parallel]
tensor_model_parallel_size = 2
[train]
micro_batch_size = 1
global_batch_size = 4
train_iters = {iters}
lr = 1e-3
lr_warmup_iters = 2
[checkpoint]
save = {save}
save_interval = {save_interval}
[log]
log_interval = 1
[slurm]
job_name = {name}
folder = {folder}
gpus_per_node = 2
time = "00:20:00"
signal_before_s = 30
max_requeue = 2
[slurm.env]
OMP_NUM_THREADS = "1"
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A model directory for `hpctrain sft --model DIR`: config.json of a tiny Qwen2 and a byte-level tokenizer
    (the 256 byte symbols, no merges) with the Qwen2.5 fixture's chat template and special tokens. The Qwen2.5
    tokenizer itself would force a 152k vocabulary: 5x slower steps, 120 MB checkpoints. No weights: with
    load_safetensors = false the trainer initialises the model from the seed, identically in every run."""
    from tiny_hf import byte_tokenizer
    from transformers import Qwen2Config

    out = tmp_path_factory.mktemp("tiny-qwen2")
    byte_tokenizer(out)
    Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False).save_pretrained(out)
    return out


def write_config(tmp: Path, model: Path, name: str) -> tuple[Path, Path]:
    save = tmp / "ckpt"
    cfg = tmp / "job.toml"
    q = json.dumps  # a TOML basic string is a JSON string for these values
    cfg.write_text(JOB_TOML.format(model=q(str(model)), dataset=q(str(DATA)), iters=ITERS, save=q(str(save)),
                                   save_interval=SAVE_INTERVAL, name=q(name), folder=q(str(tmp / "jobs"))))
    return cfg, save


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpctrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=180)


@dataclass
class Job:
    name: str
    job_id: str
    save: Path               # [checkpoint] save
    logs: Path               # folder holding the job's logs
    log_glob: str            # rank 0's log(s) under `logs`
    submit_out: str = ""
    signal_at: int | None = None
    signalled_after: int | None = None  # the last iteration in the log when the signal was sent

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.rglob(self.log_glob)))

    def run_dir(self) -> Path:
        """The run's checkpoint root: <save>/v0-<time> (add_version on the first start)."""
        roots = [p.parent for p in self.save.rglob(layout.TRACKER)] if self.save.is_dir() else []
        assert len(roots) == 1, f"{self.name}: expected one run directory under {self.save}, found {roots}"
        return roots[0]

    def losses(self) -> list[tuple[int, float]]:
        recs = [json.loads(x) for x in (self.run_dir() / "logging.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["loss"]) for r in recs if "loss" in r]


def _job_gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode != 0 or not out.stdout.strip()


def _last_iteration(text: str) -> int:
    return max((int(i) for i in re.findall(rf"iter (\d+)/{ITERS} ", text)), default=0)


def _diagnose(job: Job) -> str:
    texts = "\n".join(f"== {p}\n" + p.read_text(errors="replace")[-4000:] for p in sorted(job.logs.rglob("*"))
                      if p.is_file() and p.suffix in (".out", ".err"))
    state = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    return f"job {job.name} ({job.job_id}), signalled after iteration {job.signalled_after}:\n{state}\n{texts}"


def drive(jobs: list[Job], timeout_s: float = 900) -> None:
    """Wait for every job to leave the queue; signal each job with signal_at once its log shows that iteration
    (deterministic: the signal lands while the trainer is mid-run, after its handler is installed)."""
    deadline = time.monotonic() + timeout_s
    pending = list(jobs)
    while pending:
        for job in list(pending):
            if job.signal_at and job.signalled_after is None and \
                    (last := _last_iteration(job.log())) >= job.signal_at:
                subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
                job.signalled_after = last
            elif _job_gone(job.job_id):
                pending.remove(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still running after {timeout_s:.0f} s:\n" + "\n".join(map(_diagnose, pending)))
        time.sleep(0.25)


def submit(tmp: Path, model: Path, name: str, job_name: str, *extra: str) -> Job:
    cfg, save = write_config(tmp, model, job_name)
    proc = run_cli("submit", "--nodes", "2", str(cfg), "--cpu", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    # submitit: rank 0's stdout/stderr are <folder>/<job>_0_log.out/.err (appended to across requeues)
    return Job(name, job_id, save, tmp / "jobs", f"{job_id}_0_log.*", proc.stdout)


def submit_plain_sbatch(tmp: Path, model: Path) -> Job:
    cfg, save = write_config(tmp, model, "plain")
    env = dict(os.environ, CONFIG=str(cfg), PYTHON=sys.executable, MAX_REQUEUE="2", OMP_NUM_THREADS="1")
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                          "--cpus-per-task=1", f"--output={tmp / 'plain-%j.out'}", "--time=20",
                          str(ROOT / "slurm" / "train.sbatch")], capture_output=True, text=True, cwd=tmp, env=env,
                         timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    return Job("plain", job_id, save, tmp, f"plain-{job_id}.out")


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tiny_model, tmp_path_factory) -> dict[str, Job]:
    # a job name with a quote, `;`, `$()` and spaces reaches Slurm intact and runs
    straight = submit(tmp_path_factory.mktemp("straight"), tiny_model, "straight", "straight; $(echo x) 'run'")
    preempted = submit(tmp_path_factory.mktemp("preempted"), tiny_model, "preempted", "preempted",
                       "--launcher", "torchrun")
    plain = submit_plain_sbatch(tmp_path_factory.mktemp("plain"), tiny_model)
    preempted.signal_at = plain.signal_at = SIGNAL_AT
    all_jobs = [straight, preempted, plain]
    drive(all_jobs)
    for job in all_jobs:
        try:
            tracker = layout.read_tracker(job.run_dir())
        except (AssertionError, OSError, ValueError) as e:
            raise AssertionError(f"{e}\n{_diagnose(job)}") from e
        assert tracker == (ITERS, False), f"tracker {tracker}\n{_diagnose(job)}"
    return {j.name: j for j in all_jobs}


def test_submitit_function_job_returns(slurm_cluster, tmp_path):
    import submitit

    folder = tmp_path / "fn jobs; $(x)"
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_job_name="fn 'q'", timeout_min=5, nodes=1, tasks_per_node=1)
    job = ex.submit(sum, [1, 2, 3])
    assert job.result() == 6
    name = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "JobName=fn 'q'" in name or name == ""  # the record may already be purged


def test_impossible_request_fails_fast_with_clear_message(slurm_cluster, tiny_model, tmp_path):
    cfg, _ = write_config(tmp_path, tiny_model, "too-big")
    proc = run_cli("submit", "--nodes", "5", str(cfg), "--cpu", "--global_batch_size", "20")
    # refused by sbatch at submission (EnforcePartLimits=ALL), not left pending: exit 1 with Slurm's reason
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Slurm refused the job" in proc.stderr and "Node count specification invalid" in proc.stderr
    assert "submitted job" not in proc.stdout


def test_submit_2_nodes_x_2_tasks_trains_and_checkpoints(jobs):
    job = jobs["straight"]
    assert "TP=2 PP=1 CP=1 DP=2 on 4 GPUs (2 nodes x 2)" in job.submit_out  # the plan is printed
    assert "stdout:" in job.submit_out and "stderr:" in job.submit_out
    root = job.run_dir()
    assert layout.read_tracker(root) == (ITERS, False)
    saves = (SAVE_INTERVAL, 2 * SAVE_INTERVAL, ITERS)
    assert {p.name for p in root.glob("iter_*")} == {f"iter_{i:07d}" for i in saves}
    log = job.log()
    assert sorted(int(i) for i in re.findall(rf"iter (\d+)/{ITERS} ", log)) == list(range(1, ITERS + 1))
    assert f"training finished at iteration {ITERS}" in log
    # 4 ranks, one srun task each, on 2 nodes; MASTER_ADDR = the first node (n1), resolved inside the job
    # (its hosts file maps n1 to 127.0.0.1)
    assert "rank 0/4 on n1 (srun): master 127.0.0.1:" in log
    losses = job.losses()
    assert [i for i, _ in losses] == list(range(1, ITERS + 1))
    assert losses[-1][1] < losses[0][1] - 0.1  # it trains (a random model starts near ln(320) = 5.77)


def _check_resumed(job: Job, reference: Job, requeue_text: str) -> None:
    assert job.signalled_after is not None, f"{job.name} never reached iteration {SIGNAL_AT}"
    log = job.log()
    saved = re.search(r"stop signal received: saved at iteration (\d+), exiting with 42", log)
    assert saved, _diagnose(job)
    at = int(saved.group(1))
    assert SIGNAL_AT <= at < ITERS
    assert requeue_text in log, _diagnose(job)
    losses = job.losses()
    # iterations 1..at from the first start, at+1..ITERS from the resumed one (it loaded the checkpoint:
    # a fresh start would log 1.. again), each loss bitwise equal to the uninterrupted run's
    assert [i for i, _ in losses] == list(range(1, ITERS + 1)), losses
    assert losses == reference.losses()
    assert layout.read_tracker(job.run_dir()) == (ITERS, False)


def test_preemption_saves_requeues_and_finishes_with_same_loss(jobs):
    """One torchrun per node (the reference ran one srun task per rank): the signal reaches the workers."""
    _check_resumed(jobs["preempted"], jobs["straight"], "Requeued job")


def test_plain_sbatch_template_requeues_and_resumes(jobs):
    """slurm/train.sbatch submitted with plain sbatch: signal -> save -> exit 42 -> scontrol requeue -> resume."""
    job = jobs["plain"]
    _check_resumed(job, jobs["straight"], f"requeueing job {job.job_id}")
    log = job.log()
    assert "restart 1" in log and "--load" in log
