"""Trainer arguments on the tiny model (CPU, gloo): precision, SGD momentum, virtual pipeline,
evaluation and manual GC (the LR schedule: test_trainer_settings.py). One single-process worker runs most jobs (cheap), one
2-process torchrun runs the virtual-pipeline layout. Instrumentation: tests/train/trainer_worker.py
("Optional job keys"). Tolerances are stated where used.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from trainer_jobs import run_plan, weights

LR = 1e-3  # trainer_worker.TINY

pytestmark = pytest.mark.slow


def log_records(save_dir: str) -> list:
    return [json.loads(x) for x in (Path(save_dir) / "logging.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer_args")
    init = tmp / "init"

    def ft(name, iters, *extra):  # always --save: without it the config defaults to ./megatron_output/<model>
        return ["--load", str(init), "--finetune", "true", "--train_iters", str(iters), "--save", str(tmp / name),
                "--add_version", "false", "--save_interval", "100", "--no_save_optim", "true", *extra]

    sgd = ["--optimizer", "sgd", "--sgd_momentum", "0.9", "--weight_decay", "0", "--clip_grad", "0",
           "--use_distributed_optimizer", "false", "--lr_warmup_iters", "0", "--lr_decay_style", "constant"]
    single = run_plan(tmp, "single", [
        {"name": "init", "init_only": True, "flags": ["--save", str(init), "--add_version", "false"]},
        {"name": "fp32", "repeat": True, "flags": ft("fp32", 4)},
        {"name": "bf16", "repeat": True, "flags": ft("bf16", 4, "--torch_dtype", "bfloat16")},
        {"name": "fp16", "repeat": True, "poison_grad_at": [3],
         "flags": ft("fp16", 5, "--torch_dtype", "float16", "--initial_loss_scale", "1024", "--hysteresis", "1")},
        {"name": "sgd", "capture_steps": 2, "flags": ft("sgd", 2, *sgd)},
        {"name": "eval", "valid": True, "flags": ft("eval", 4, "--eval_interval", "2", "--eval_iters", "3")},
        {"name": "gc_manual", "gc_trace": True,
         "flags": ft("gc_manual", 4, "--manual_gc", "true", "--manual_gc_interval", "2")},
        {"name": "gc_auto", "gc_trace": True, "flags": ft("gc_auto", 4)},
        {"name": "ref3", "flags": ft("ref3", 3)},
        {"name": "profiled", "flags": ft("profiled", 3, "--profile", "true", "--profile_step_start", "2",
                                         "--profile_step_end", "3")},
    ], timeout=900)
    multi = run_plan(tmp, "vpp", [{"name": "pp2_vpp2", "flags": ft(
        "pp2_vpp2", 3, "--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2")}],
        nproc=2, timeout=900)
    return tmp, {**single, **multi}


def test_bf16_trains_close_to_fp32_and_saves_bf16_weights(runs):
    _, r = runs
    fp32, bf16 = r["fp32"]["losses"], r["bf16"]["losses"]
    assert all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < bf16[0] - 0.05  # the same batch every step: the loss must drop
    for a, b in zip(fp32, bf16):  # bf16 rounding (8-bit mantissa) on a ~4.8 loss: well inside 2%
        assert b == pytest.approx(a, rel=2e-2)
    w = weights(r["bf16"]["last_checkpoint"])
    assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.bfloat16}
    assert {v.dtype for v in weights(r["fp32"]["last_checkpoint"]).values() if v.is_floating_point()} == \
        {torch.float32}


def test_fp16_uses_megatron_loss_scaling_and_skips_an_overflow_step(runs):
    _, r = runs
    res = r["fp16"]
    probe = res["probe"]
    assert probe["grad_scaler"] == "DynamicGradScaler"
    recs = log_records(res["save_dir"])
    assert [x["skipped"] for x in recs] == [False, False, True, False, False]  # inf grad injected at step 3
    assert res["iteration"] == 5 and all(math.isfinite(x) for x in res["losses"])
    # the skipped step changed nothing: same batch, same weights -> the same loss at step 4;
    # the LR schedule did not advance; the loss scale halved (hysteresis 1)
    assert res["losses"][3] == res["losses"][2]
    assert recs[3]["lr"] == recs[2]["lr"] and recs[2]["lr"] != recs[1]["lr"]
    assert probe["loss_scales"] == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
    for a, b in zip(r["fp32"]["losses"][:3], res["losses"][:3]):  # before the skip: close to fp32
        assert b == pytest.approx(a, rel=1e-2)
    assert res["losses"][-1] < res["losses"][0]


def test_sgd_momentum_matches_torch_sgd_on_the_same_grads(runs):
    tmp, _ = runs
    steps = torch.load(tmp / "single.out.json.sgd.steps.pt", weights_only=True)
    assert len(steps) == 2
    for a, b in zip(steps[0]["after"], steps[1]["params"]):
        assert torch.equal(a, b)
    assert set(steps[0]["lr"]) == {LR} and set(steps[1]["lr"]) == {LR}

    def replay(momentum):
        ref = [p.clone() for p in steps[0]["params"]]
        opt = torch.optim.SGD(ref, lr=LR, momentum=momentum)
        out = []
        for st in steps:
            for p, g in zip(ref, st["grads"]):
                p.grad = g.clone()
            opt.step()
            out.append([p.detach().clone() for p in ref])
        return out

    ref = replay(0.9)
    for st, want in zip(steps, ref):
        for got, w in zip(st["after"], want):
            # the same float32 ops; updates are >= ~1e-7, parameters ~0.02 (ulp ~2e-9)
            torch.testing.assert_close(got, w, rtol=0, atol=1e-8)
    no_momentum = replay(0.0)[1]
    assert max(float((a - b).abs().max()) for a, b in zip(ref[1], no_momentum)) > 1e-6  # momentum is visible


def test_virtual_pipeline_matches_single_process(runs):
    _, r = runs
    ref, got = r["ref3"], r["pp2_vpp2"]
    assert got["iteration"] == 3
    for a, b in zip(ref["losses"], got["losses"]):  # test_trainer_parallel.py's tolerances
        assert b == pytest.approx(a, rel=1e-6)
    w_ref, w = weights(ref["last_checkpoint"]), weights(got["last_checkpoint"])
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_eval_loss_is_the_forward_loss_on_the_validation_batches(runs):
    _, r = runs
    res = r["eval"]
    evals = res["probe"]["evals"]
    assert [e["after_steps"] for e in evals] == [2, 4]  # eval_interval 2 of 4 iterations
    # eval_iters counts global batches (Megatron-LM): 3 x (global 8 / micro 2 / DP 1) micro-batches
    assert res["probe"]["valid_calls"] == [12, 12]
    for e in evals:  # schedule + DP reduction vs one plain forward per micro-batch: fp32, same order
        assert e["loss"] == pytest.approx(e["by_hand"], rel=1e-6)
    assert evals[0]["loss"] != evals[1]["loss"]  # weights moved between the two
    logged = [x for x in log_records(res["save_dir"]) if "val_loss" in x]
    assert [x["iteration"] for x in logged] == [2, 4]
    for x, e in zip(logged, evals):
        assert x["val_loss"] == e["loss"] and x["val_ppl"] == pytest.approx(math.exp(e["loss"]), rel=1e-9)
    assert res["losses"] == r["gc_auto"]["losses"]  # evaluating does not disturb training


def test_manual_gc_disables_automatic_gc_and_collects_every_interval(runs):
    _, r = runs
    manual, auto = r["gc_manual"], r["gc_auto"]
    assert manual["losses"] == auto["losses"]
    assert manual["probe"]["gc_enabled_after"] is True
    # (optimizer steps done, generation, gc enabled) at the start of every collection
    during = [(s, g, en) for s, g, en in manual["probe"]["gc"] if 1 <= s <= 3]
    assert during and all(not en and g == 2 for s, g, en in during), during  # only the manual full collections
    manual_steps = {s for s, g, en in manual["probe"]["gc"] if not en}
    assert manual_steps == {2, 4}  # after iterations 2 and 4 (manual_gc_interval 2), not 1 or 3
    # control: without manual_gc the same run triggers automatic (young-generation) collections
    assert any(en and g < 2 for s, g, en in auto["probe"]["gc"] if 1 <= s <= 3)
