"""Qwen3 shapes through the trainer on megatron-core with gloo: every parallel layout trains like the
single process (the reference), and a MoE run resumes at another expert-parallel size.

Models (random, from the [model]/[moe] keys; the same initial weights for every run, written once):
* ``dense``: Qwen3's attention (q/k RMSNorm, head_dim 24 while hidden / heads = 16, no biases);
* ``moe``: the same attention, layer 0 dense and layers 1-3 MoE (``moe_layer_freq [0,1,1,1]``),
  4 experts, top-2, expert FFN 32, aux loss coefficient 0.01 (its gradients are part of every step).

Each run trains 3 iterations on the same deterministic global batches (tests/train/trainer_worker.py);
losses must equal the reference's (1e-6 relative) and so must every weight after the three updates
(1e-6 absolute: the updates are ~1e-3, so any wrong gradient shows). Layouts: dense at TP=2+SP, PP=2,
DP=2 with the distributed optimizer and CP=2; MoE (grouped experts) at EP=2 (DP=2 for the dense
parts), EP=2 with the distributed optimizer, PP=2, TP=2+SP (ETP=2), TP=2+SP with ETP=1, and
TP=2 x EP=2 on 4 processes (sequential vs grouped experts: tests/moe/test_moe_truth.py, both against
transformers, and tools/bench/check_moe.py, gradients). Resume: 10 iterations at EP=2 saving at
iteration 5 == 5 iterations at EP=2 then 5 more resumed at EP=1 (weights 1e-6).
"""
from pathlib import Path

import pytest
import torch

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from trainer_jobs import run_plan, weights  # noqa: E402

pytestmark = pytest.mark.slow

ATTN = ["--qk_layernorm", "true", "--add_qkv_bias", "false"]
SHAPES = {
    "dense": ATTN + ["--kv_channels", "24"],
    "moe": ATTN + ["--kv_channels", "16", "--num_experts", "4", "--moe_router_topk", "2",
                   "--moe_ffn_hidden_size", "32", "--moe_aux_loss_coeff", "0.01", "--moe_layer_freq", "[0,1,1,1]"],
}
SP = ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"]
EP2 = ["--expert_model_parallel_size", "2"]
LAYOUTS = {
    "dense": {"tp2_sp": SP, "pp2": ["--pipeline_model_parallel_size", "2"],
              "dp2_distopt": ["--use_distributed_optimizer", "true"], "cp2": ["--context_parallel_size", "2"]},
    "moe": {"ep2": EP2, "ep2_distopt": EP2 + ["--use_distributed_optimizer", "true"],
            "pp2": ["--pipeline_model_parallel_size", "2"], "tp2_sp": SP,
            "tp2_sp_etp1": SP + ["--expert_tensor_parallel_size", "1"]},
}
FOUR = {"moe": {"tp2_sp_ep2": SP + EP2}}


def finetune(shape: str, init: Path, save: Path, iters: int, *extra) -> list:
    return SHAPES[shape] + ["--load", str(init), "--finetune", "true", "--train_iters", str(iters), "--save",
                            str(save), "--save_interval", "100", "--no_save_optim", "true",
                            "--use_distributed_optimizer", "false", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3_layouts")
    single = []
    for shape in SHAPES:
        init = tmp / f"{shape}-init"
        single += [{"name": f"{shape}-init", "init_only": True, "flags": SHAPES[shape] + [
                        "--save", str(init), "--add_version", "false"]},
                   {"name": f"{shape}-ref", "flags": finetune(shape, init, tmp / f"{shape}-ref", 3)}]
    out = run_plan(tmp, "single", single)

    def jobs(table):
        return [{"name": f"{shape}-{lay}", "flags": finetune(shape, tmp / f"{shape}-init", tmp / f"{shape}-{lay}", 3,
                                                            *flags)}
                for shape, lays in table.items() for lay, flags in lays.items()]

    moe = SHAPES["moe"]
    straight = moe + EP2 + ["--load", str(tmp / "moe-init"), "--finetune", "true", "--train_iters", "10",
                            "--save", str(tmp / "straight"), "--add_version", "false", "--save_interval", "5",
                            "--use_distributed_optimizer", "false"]
    resumed = moe + ["--load", str(tmp / "straight" / "iter_0000005"), "--train_iters", "10", "--save",
                     str(tmp / "resumed"), "--save_interval", "100", "--use_distributed_optimizer", "false"]
    two = jobs(LAYOUTS) + [{"name": "straight", "flags": straight}, {"name": "resumed_ep1", "flags": resumed}]
    out.update(run_plan(tmp, "two", two, nproc=2, timeout=900))
    out.update(run_plan(tmp, "four", jobs(FOUR), nproc=4, timeout=900))
    return out


def assert_same_run(ref: dict, got: dict, what: str, iters: int = 3, rel=1e-6, atol=1e-6):
    assert got["iteration"] == ref["iteration"] == iters
    assert len(got["losses"]) == len(ref["losses"])
    for a, b in zip(ref["losses"], got["losses"]):
        assert b == pytest.approx(a, rel=rel), what
    w_ref, w = weights(ref["last_checkpoint"]), weights(got["last_checkpoint"])
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("run", [f"{s}-{lay}" for t in (LAYOUTS, FOUR) for s, lays in t.items() for lay in lays])
def test_layout_trains_like_the_single_process(runs, run):
    assert_same_run(runs[f"{run.split('-')[0]}-ref"], runs[run], run)


def test_the_moe_model_has_experts_and_dense_layers(runs):
    w = weights(runs["moe-ref"]["last_checkpoint"])
    assert w["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].shape == (4, 64, 64)  # [experts, 2*32, h]
    assert w["decoder.layers.0.mlp.linear_fc1.weight"].shape == (256, 64)  # layer 0 dense (ffn 128)
    assert w["decoder.layers.2.mlp.router.weight"].shape == (4, 64)
    assert "decoder.layers.0.mlp.router.weight" not in w


def test_resume_at_another_expert_parallel_size(runs):
    """Iterations 6-10 resumed at EP=1 from the EP=2 checkpoint of iteration 5 == straight at EP=2."""
    straight, resumed = runs["straight"], runs["resumed_ep1"]
    assert resumed["iteration"] == straight["iteration"] == 10
    for a, b in zip(straight["losses"][5:], resumed["losses"]):
        assert b == pytest.approx(a, rel=1e-6)
    w_s, w_r = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
    for k in w_s:
        torch.testing.assert_close(w_r[k], w_s[k], rtol=0, atol=1e-6, msg=lambda m: f"resume {k}: {m}")
