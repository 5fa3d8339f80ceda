"""Trainer on megatron-core with gloo: parallel layouts equal the single-process run; resume is exact.

Every run starts from the same initial weights (a torch_dist checkpoint written once, loaded with
--finetune) and trains on the same deterministic global batches (tests/train/trainer_worker.py).
Tolerances (fp32 on CPU): losses 1e-6 relative; weights 1e-6 absolute (updates are ~1e-3,
summation-order differences between layouts are ~1e-7). Resume at the same layout: bitwise.
"""
from pathlib import Path

import pytest
import torch
from trainer_jobs import run_plan, weights

pytestmark = pytest.mark.slow


def finetune(init: Path, save: Path, iters: int, *extra) -> list:
    return ["--load", str(init), "--finetune", "true", "--train_iters", str(iters), "--save", str(save),
            "--save_interval", "100", "--no_save_optim", "true", *extra]


LAYOUTS = {
    "tp2_sp_selective": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
                         "--recompute_granularity", "selective", "--recompute_modules", "core_attn", "layernorm"],
    "tp2": ["--tensor_model_parallel_size", "2", "--recompute_granularity", "none"],
    "pp2_full_uniform": ["--pipeline_model_parallel_size", "2", "--recompute_granularity", "full",
                         "--recompute_method", "uniform", "--recompute_num_layers", "1"],
    "dp2_full_block": ["--use_distributed_optimizer", "false", "--recompute_granularity", "full",
                       "--recompute_method", "block", "--recompute_num_layers", "2"],
    "dp2_distopt": ["--use_distributed_optimizer", "true"],
    "cp2": ["--context_parallel_size", "2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    init = tmp / "init"
    single = run_plan(tmp, "single", [
        {"name": "init", "init_only": True, "flags": ["--save", str(init), "--add_version", "false"]},
        {"name": "ref", "flags": finetune(init, tmp / "ref", 3)},
        {"name": "ref_packed", "pack": True, "flags": finetune(init, tmp / "ref_packed", 3)},
        {"name": "ref_split", "pack": "split", "flags": finetune(init, tmp / "ref_split", 3)},
        {"name": "ref_chunked_ce", "flags": finetune(init, tmp / "ref_chunked_ce", 3,
                                                     "--cross_entropy_loss_fusion", "true")},
    ])
    jobs = [{"name": n, "flags": finetune(init, tmp / n, 3, *f)} for n, f in LAYOUTS.items()]
    jobs.append({"name": "tp2_sp_packed", "pack": True,
                 "flags": finetune(init, tmp / "tp2_sp_packed", 3, *LAYOUTS["tp2_sp_selective"])})
    jobs.append({"name": "cp2_packed", "pack": True,
                 "flags": finetune(init, tmp / "cp2_packed", 3, *LAYOUTS["cp2"])})
    straight = ["--load", str(init), "--finetune", "true", "--train_iters", "10", "--save", str(tmp / "straight"),
                "--add_version", "false", "--save_interval", "5"]
    jobs.append({"name": "straight", "flags": straight})
    jobs.append({"name": "resumed", "flags": ["--load", str(tmp / "straight" / "iter_0000005"), "--train_iters",
                                              "10", "--save", str(tmp / "resumed"), "--save_interval", "100"]})
    multi = run_plan(tmp, "multi", jobs, nproc=2)
    dp1 = run_plan(tmp, "dp1", [{"name": "resumed_dp1", "flags": [
        "--load", str(tmp / "straight" / "iter_0000005"), "--train_iters", "10", "--save", str(tmp / "resumed_dp1"),
        "--save_interval", "100"]}])
    return {**single, **multi, **dp1}


def assert_same_run(ref: dict, got: dict, what: str, rel=1e-6, atol=1e-6):
    assert got["iteration"] == ref["iteration"] == 3
    for a, b in zip(ref["losses"], got["losses"]):
        assert b == pytest.approx(a, rel=rel)
    w_ref, w = weights(ref["last_checkpoint"]), weights(got["last_checkpoint"])
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        assert w[k].shape == w_ref[k].shape, k
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["tp2_sp_packed", "cp2_packed"])
def test_layout_matches_single_process(runs, layout):
    assert_same_run(runs["ref_packed" if "packed" in layout else "ref"], runs[layout], layout)


def test_packed_rows_equal_one_sample_per_row(runs):
    """Packing changes nothing but speed: samples in a row neither see each other nor share RoPE
    positions (thd stream, positions restart per sample). fp32 summation order differs: 1e-5."""
    assert_same_run(runs["ref_split"], runs["ref_packed"], "packed vs split", rel=1e-5, atol=1e-5)


def test_chunked_cross_entropy_equals_megatron_loss(runs):
    assert_same_run(runs["ref"], runs["ref_chunked_ce"], "cross_entropy_loss_fusion", rel=1e-6, atol=1e-6)


def test_training_moves_weights_and_loss(runs, tmp_path):
    init = Path(runs["straight"]["last_checkpoint"]).parents[1] / "init" / "iter_0000000"
    w0, w = weights(str(init)), weights(runs["ref"]["last_checkpoint"])
    assert max(float((w[k] - w0[k]).abs().max()) for k in w) > 1e-4  # the tolerance above is meaningful
    losses = runs["straight"]["losses"]
    assert losses[-1] != losses[0]


def test_resume_is_bitwise(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert resumed["iteration"] == 10
    assert resumed["losses"] == straight["losses"][5:]
    ws, wr = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
    for k in ws:
        assert torch.equal(ws[k], wr[k]), k


def test_resume_at_other_dp_size(runs):
    straight, dp1 = runs["straight"], runs["resumed_dp1"]
    assert dp1["iteration"] == 10
    for a, b in zip(straight["losses"][5:], dp1["losses"]):
        assert b == pytest.approx(a, rel=1e-6)
    ws, wr = weights(straight["last_checkpoint"]), weights(dp1["last_checkpoint"])
    for k in ws:
        torch.testing.assert_close(wr[k], ws[k], rtol=0, atol=1e-6)
