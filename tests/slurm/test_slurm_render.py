"""sbatch rendering: golden files, parameter mapping, and hostile strings rendered safely."""
import os
import subprocess
from pathlib import Path

import pytest

from hpctrain.config.sections import SlurmConfig
from hpctrain.launch.render import executor_params, extra_sbatch_params, parse_time_minutes, render_script

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HPCTRAIN_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs; rerun with HPCTRAIN_UPDATE_GOLDEN=1 after checking the diff"


def cluster_slurm() -> SlurmConfig:
    return SlurmConfig(partition="gpu", account="proj42", qos="high", time="1-04:00:00", constraint="h100",
                       exclusive=True, mem="400G", cpus_per_task=12, job_name="qwen7b-sft",
                       extra_sbatch=["--reservation=big", "--mail-type END"], env={"HF_HOME": "/scratch/hf"},
                       setup=["module load cuda/12.4"], signal_before_s=300)


def test_golden_train_4x8():
    params = executor_params(cluster_slurm(), nodes=4, gpus_per_node=8, environ={"NCCL_IB_HCA": "mlx5", "HOME": "/x"})
    check_golden("train_4x8.sbatch", render_script(params, "/jobs/qwen7b-sft-1", "/opt/venv/bin/python"))


def test_golden_torchrun_one_task_per_node():
    params = executor_params(SlurmConfig(job_name="pt", time="30"), nodes=2, gpus_per_node=4, launcher="torchrun")
    assert params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 4
    check_golden("train_torchrun_2x4.sbatch", render_script(params, "/jobs/pt-1", "/usr/bin/python3"))


def test_parameter_mapping():
    p = executor_params(cluster_slurm(), nodes=4, gpus_per_node=8)
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"]) == (4, 8, 8, 28 * 60)
    assert p["additional_parameters"] == {"signal": "USR1@300", "requeue": True, "reservation": "big",
                                          "mail-type": "END"}
    assert "gpus_per_node" not in executor_params(SlurmConfig(), 1, 2, use_gpus=False)


def test_time_and_extra_sbatch_parsing():
    assert [parse_time_minutes(t) for t in ("90", "01:30:00", "2-00:00:00", "10:30", "00:00:30")] == [90, 90, 2880, 11, 1]
    with pytest.raises(ValueError, match="not a Slurm time"):
        parse_time_minutes("soon")
    with pytest.raises(ValueError, match="extra_sbatch entry"):
        extra_sbatch_params(["reservation=x"])
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        executor_params(SlurmConfig(env={"A;rm": "x"}), 1, 1)


HOSTILE = "it's; $(touch PWNED) `touch PWNED2` \"a b\" & | > x"


def test_hostile_strings_render_safely(tmp_path):
    slurm = SlurmConfig(job_name=HOSTILE, env={"WEIRD": HOSTILE, "EMPTY": ""})
    folder = str(tmp_path / "job dir; $(touch PWNED3) 'q'")
    params = executor_params(slurm, 1, 2, environ={"NCCL_DEBUG": HOSTILE})
    script = render_script(params, folder, "/opt/my venv/bin/python")
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # Run the script up to (not including) its command section with srun replaced by a recorder:
    # every value must arrive byte-exact and nothing may execute.
    probe = script.replace("export SUBMITIT_EXECUTOR=slurm", "printf '%s\\0' \"$WEIRD\" \"$EMPTY\" \"$NCCL_DEBUG\"; exit 0")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(b"\0")[:3] == [HOSTILE.encode(), b"", HOSTILE.encode()]
    assert not list(tmp_path.glob("PWNED*"))
    # the srun line's arguments (python path, folder) parse back to exactly what we gave
    srun_line = next(line for line in script.splitlines() if line.startswith("srun "))
    argv = subprocess.run(["bash", "-c", "f() { printf '%s\\0' \"$@\"; }; f " + srun_line[len("srun "):]],
                          capture_output=True, cwd=tmp_path).stdout.split(b"\0")
    assert b"/opt/my venv/bin/python" in argv and folder.encode() in argv
    assert not list(tmp_path.glob("PWNED*"))
    # #SBATCH values are single shell words too
    name_line = next(line for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
    value = subprocess.run(["bash", "-c", "printf '%s' " + name_line[len("#SBATCH --job-name="):]],
                           capture_output=True, cwd=tmp_path).stdout.decode()
    assert value == HOSTILE


def test_no_time_limit_means_no_time_line():
    script = render_script(executor_params(SlurmConfig(job_name="x"), 1, 1), "/jobs/x", "python")
    assert "--time" not in script
