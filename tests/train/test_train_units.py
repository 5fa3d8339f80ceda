"""Fast unit tests of the trainer's pure pieces (no process group)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from hpctrain.train import dist
from hpctrain.train.step import IGNORE, model_inputs, pad_microbatches, segment_cu_seqlens


def test_segment_cu_seqlens_and_thd_inputs_keep_samples_apart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 starts mid-sample (a row start is a start)
    assert segment_cu_seqlens(pos).tolist() == [0, 3, 5, 6, 8, 12]
    b = dict(input_ids=torch.arange(12).view(2, 6), labels=torch.arange(12).view(2, 6), position_ids=pos,
             packed=True)
    out, cu = model_inputs(b, cp_size=1, cp_rank=0)
    assert out["input_ids"].shape == (1, 12) and torch.equal(out["input_ids"][0], torch.arange(12))
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    unpacked, none = model_inputs({k: v for k, v in b.items() if k != "packed"}, cp_size=1, cp_rank=0)
    assert none is None and unpacked["input_ids"].shape == (2, 6)


def test_pad_microbatches_pads_labels_with_ignore_and_keeps_tokens():
    mb = [dict(input_ids=torch.arange(5).view(1, 5), labels=torch.arange(5).view(1, 5),
               position_ids=torch.arange(5).view(1, 5)),
          dict(input_ids=torch.arange(7).view(1, 7), labels=torch.arange(7).view(1, 7),
               position_ids=torch.arange(7).view(1, 7))]
    out = pad_microbatches(mb, multiple=4, same_length=True)
    assert [b["input_ids"].shape[1] for b in out] == [8, 8]
    assert torch.equal(out[0]["labels"][0, 5:], torch.full((3,), IGNORE))
    assert torch.equal(out[0]["input_ids"][0, :5], torch.arange(5))
    assert torch.equal(out[0]["position_ids"][0], torch.arange(8))
    out = pad_microbatches(mb, multiple=2, same_length=False)
    assert [b["input_ids"].shape[1] for b in out] == [6, 8]
    # A fixed row length (packed rows on a GPU): every micro-batch gets it, rounded to the multiple.
    out = pad_microbatches(mb, multiple=4, same_length=False, row_length=10)
    assert [b["input_ids"].shape[1] for b in out] == [12, 12]
    assert torch.equal(out[1]["labels"][0, 7:], torch.full((5,), IGNORE))


def test_packed_forward_plans_attention_from_host_offsets(monkeypatch):
    """forward_step builds the attention's masking plan from the CPU offsets before the model runs,
    so no layer reads cu_seqlens back from the device (a sync per micro-batch on a GPU)."""
    from megatron.core import parallel_state as ps

    from hpctrain.model.portable import attention
    from hpctrain.train import step
    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: 1)
    attention._PLAN_CACHE.clear()
    seen = {}

    def model(ids, pos, mask, labels=None, packed_seq_params=None, loss_mask=None):
        key_cu = packed_seq_params.cu_seqlens_q
        seen["plans"] = [k for k in attention._PLAN_CACHE if k[0] == (key_cu.data_ptr(), key_cu._version)]
        return torch.zeros(ids.shape)

    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    b = dict(input_ids=torch.arange(6).view(1, 6), labels=torch.arange(6).view(1, 6), position_ids=pos,
             packed=True)
    step.forward_step(torch.device("cpu"), iter([b]), model)
    assert len(seen["plans"]) == 1
    plan = attention._PLAN_CACHE[seen["plans"][0]][1]
    assert plan.doc.tolist() == [0, 0, 0, 1, 1, 2]


def test_rank_env_torchrun_slurm_single(monkeypatch):
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h1", MASTER_PORT="1234")
    r = dist.rank_env(env)
    assert (r["rank"], r["world_size"], r["local_rank"], r["master_addr"], r["master_port"], r["source"]) == \
        (3, 4, 1, "h1", 1234, "torchrun")
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="777", MASTER_ADDR="n1")
    r = dist.rank_env(env)
    assert (r["rank"], r["world_size"], r["local_rank"], r["master_addr"], r["source"]) == (5, 8, 1, "n1", "slurm")
    assert r["master_port"] == 20000 + 777
    r = dist.rank_env({})
    assert (r["rank"], r["world_size"], r["source"]) == (0, 1, "single") and r["master_port"] > 0


def test_rank_env_is_launch_envs_derivation(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol needed: the host list is expanded in Python
    env = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="42")
    r = dist.rank_env(env)
    assert (r["rank"], r["world_size"], r["master_addr"], r["master_port"]) == (1, 2, "gpu07", 20042)
    from hpctrain.launch.env import derive_dist_env
    d = derive_dist_env(env)
    assert {k: d[k] for k in r} == r
    # a batch shell (SLURM_PROCID but no task count) is a single process on a free port
    r = dist.rank_env(dict(SLURM_PROCID="0", SLURM_JOB_ID="42"))
    assert (r["world_size"], r["source"]) == (1, "single") and r["master_port"] != 20042
    with pytest.raises(ValueError, match="unbalanced"):
        dist.rank_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2"))


def test_compat_cpu_patches_in_a_fresh_process():
    # compat patches torch process-wide, so it is exercised in its own interpreter.
    code = textwrap.dedent("""
        import torch
        from hpctrain.train import compat
        compat.apply("cpu"); compat.apply("cpu")  # idempotent
        assert compat.applied() == {"common", "cpu"}
        t = compat.megatron_torch().zeros(3, device="cuda")  # what megatron-core's modules call
        assert t.device.type == "cpu"
        assert t.cuda() is t and t.pin_memory() is t
        assert t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor" and t.type(torch.float64).dtype == torch.float64
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.manual_seed(7); a = torch.rand(2)
        torch.manual_seed(7); b = torch.rand(2)
        assert torch.equal(a, b)
        from megatron.core.tensor_parallel import random as r
        assert r.CheckpointWithoutOutput().fp8 is False
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_compat_refuses_other_megatron_versions(monkeypatch):
    from megatron.core import package_info

    from hpctrain.train import compat
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.delenv("HPCTRAIN_COMPAT_ANY_MCORE", raising=False)
    with pytest.raises(RuntimeError, match="0.16.1"):
        compat._check_mcore_version()
    monkeypatch.setenv("HPCTRAIN_COMPAT_ANY_MCORE", "1")
    with pytest.warns(UserWarning):
        compat._check_mcore_version()
