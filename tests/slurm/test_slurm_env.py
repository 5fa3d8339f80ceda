"""derive_dist_env: a pure function of the environment (torchrun, Slurm task, single process)."""
import pytest

from hpctrain.launch.env import derive_dist_env, expand_hostlist, torch_env


def test_expand_hostlist():
    assert expand_hostlist("n[1-3]") == ["n1", "n2", "n3"]
    assert expand_hostlist("gpu[01-02,07],login1") == ["gpu01", "gpu02", "gpu07", "login1"]
    assert expand_hostlist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_hostlist("n[1-2")


def test_slurm_task_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "node[07-10]", "SLURM_JOB_ID": "123456",
           "SLURM_NTASKS_PER_NODE": "2"}
    d = derive_dist_env(env)
    assert (d["rank"], d["world_size"], d["local_rank"], d["node_rank"], d["nnodes"]) == (5, 8, 1, 2, 4)
    assert d["master_addr"] == "node07" and d["master_port"] == 20000 + 123456 % 20000
    assert d["local_world_size"] == 2 and d["source"] == "slurm"
    # the step's values win over the job's; an explicit MASTER_ADDR/PORT wins over derivation
    env.update(SLURM_STEP_NODELIST="node[09-10]", SLURM_STEP_NUM_TASKS="4", MASTER_PORT="1234")
    d = derive_dist_env(env)
    assert (d["master_addr"], d["world_size"], d["master_port"]) == ("node09", 4, 1234)


def test_torchrun_env_wins_and_round_trips():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
           "MASTER_PORT": "29999", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    d = derive_dist_env(env)
    assert (d["rank"], d["world_size"], d["local_rank"], d["nnodes"], d["source"]) == (3, 4, 1, 2, "torchrun")
    assert derive_dist_env(torch_env(d))["rank"] == 3


def test_single_process_default():
    d = derive_dist_env({})
    assert (d["rank"], d["world_size"], d["local_rank"], d["source"]) == (0, 1, 0, "single")


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        derive_dist_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
