"""`hpctrain submit --dry-run` (no cluster needed): plan + script, profiles, one-node jobs, refusals."""
from pathlib import Path

from hpctrain.launch.submit import run

ROOT = Path(__file__).resolve().parents[2]
QWEN = str(ROOT / "hpctrain" / "assets" / "configs" / "qwen2.5-0.5b-instruct.config.json")


def test_dry_run_prints_plan_and_script_and_creates_nothing(tmp_path, capsys):
    rc = run(["--nodes", "2", "--gpus-per-node", "4", "--dry-run", "--model", QWEN, "--folder", str(tmp_path / "jobs"),
              "--global_batch_size", "16", "--partition", "gpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "TP=1 PP=1 CP=1 DP=8 on 8 GPUs (2 nodes x 4)" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out and "#SBATCH --partition=gpu" in out
    assert "#SBATCH --signal=USR1@120" in out and "#SBATCH --requeue" in out
    assert not (tmp_path / "jobs").exists()


def test_layout_refusal_stops_before_submitting(tmp_path, capsys):
    rc = run(["--nodes", "1", "--gpus-per-node", "4", "--dry-run", "--model", QWEN, "--tensor_model_parallel_size",
              "4", "--folder", str(tmp_path)])
    assert rc == 2
    assert "num_attention_heads(14) % tp(4) = 2 != 0" in capsys.readouterr().err


def test_profile_is_below_job_file_and_flags(tmp_path, capsys):
    profile = tmp_path / "cluster.toml"
    profile.write_text('[slurm]\npartition = "big"\naccount = "acct"\nqos = "low"\nsetup = ["module load x"]\n')
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nmodel = "{QWEN}"\n[train]\nglobal_batch_size = 8\n[slurm]\nqos = "high"\n')
    rc = run(["--nodes", "1", "--gpus-per-node", "8", "--dry-run", "--profile", str(profile), str(job),
              "--account", "mine"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --partition=big" in out           # from the profile
    assert "#SBATCH --qos=high" in out                # the job file wins over the profile
    assert "#SBATCH --account=mine" in out            # the command line wins over both
    assert "module load x" in out


def test_profile_with_other_sections_is_refused(tmp_path, capsys):
    profile = tmp_path / "cluster.toml"
    profile.write_text('[slurm]\npartition = "big"\n[train]\nlr = 1.0\n')
    rc = run(["--nodes", "1", "--gpus-per-node", "1", "--dry-run", "--profile", str(profile), "--model", QWEN,
              "--global_batch_size", "1"])
    assert rc == 2
    assert "holds only a [slurm] section" in capsys.readouterr().err


def test_one_node_jobs(capsys):
    assert run(["export", "--dry-run", "--model", "/m", "--to_mcore", "true"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=1" in out and "#SBATCH --nodes=1" in out and "hpctrain-export" in out
    assert run(["reshard", "--dry-run", "/ckpt", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "gpus-per-node" not in out and "#SBATCH --ntasks-per-node=1" in out


def test_resume_flags_only_on_restart_and_newest_checkpoint(tmp_path, monkeypatch):
    import os
    import time

    from hpctrain.launch.resume import resume_flags
    from hpctrain.launch.task import TrainTask, latest_checkpoint

    save = tmp_path / "save"
    old, new = save / "v0-20260101-000000", save / "v1-20260102-000000"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "latest_checkpointed_iteration.txt").write_text("5")
    os.utime(old / "latest_checkpointed_iteration.txt", (time.time() - 100, time.time() - 100))
    assert latest_checkpoint(str(save)) == new
    assert resume_flags(str(save), restart_count=0) == []
    assert resume_flags(str(save), restart_count=1) == ["--load", str(new), "--save", str(new), "--finetune",
                                                        "false", "--add_version", "false"]
    assert resume_flags(str(tmp_path / "none"), restart_count=1) == []
    # the requeued copy of a task carries the flags; past max_requeue there is no copy
    task = TrainTask(program=["python", "-m", "hpctrain.cli", "sft", "c.toml"], save_dir=str(save), max_requeue=1)
    nxt = task.checkpoint().function
    assert nxt.resume_args[:2] == ["--load", str(new)] and nxt.requeues == 1
    assert nxt.checkpoint() is None


def test_torchrun_command_per_node():
    import sys

    from hpctrain.launch.task import TrainTask

    task = TrainTask(program=[sys.executable, "-m", "hpctrain.cli", "sft", "c.toml"], launcher="torchrun",
                     gpus_per_node=8)
    dist = {"nnodes": 4, "node_rank": 2, "master_addr": "gpu01", "master_port": 20017}
    assert task.command(dist) == [sys.executable, "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8",
                                  "--node-rank=2", "--master-addr=gpu01", "--master-port=20017",
                                  "-m", "hpctrain.cli", "sft", "c.toml"]
    script = TrainTask(program=[sys.executable, "/x/train.py", "c.toml"], launcher="torchrun", gpus_per_node=2)
    assert script.command(dist)[-2:] == ["/x/train.py", "c.toml"]
