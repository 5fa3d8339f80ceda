"""Each wired setting has its effect, shown on what a user looks at: the learning rate of every iteration
against megatron-core's own OptimizerParamScheduler, the resume rules for a changed schedule, max_epochs
with train_iters, the log_* switches (logging.jsonl and the TensorBoard event files), the parameter norm
against the saved weights, ckpt_format = torch (Megatron-LM's rank files, compared tensor by tensor) and
loading either format, the loader's worker processes and order, and the timeout of every process group.

Tiny model on CPU (tests/train/trainer_worker.py); one single-process worker runs most jobs, one
2-process torchrun the TP=2 saves.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from trainer_jobs import run_plan, weights

from hpctrain.checkpoint import legacy
from hpctrain.checkpoint.reshard import reshard

LR, MIN_LR, GBS, WD = 1e-3, 1e-4, 8, 0.1  # trainer_worker.TINY
NO_STATE = ["--no_save_optim", "true", "--no_save_rng", "true"]

pytestmark = pytest.mark.slow


def records(save_dir) -> list:
    return [json.loads(x) for x in (Path(save_dir) / "logging.jsonl").read_text().splitlines()]


def lrs(save_dir) -> list:
    return [r["lr"] for r in records(save_dir) if "lr" in r]


def megatron_lrs(n: int, train_iters: int, style: str, warmup_iters: int = 0, warmup_fraction=None,
                 decay_iters=None, wsd_iters=None, wsd_style=None, start: int = 0) -> list:
    """The lr of iterations start+1 .. start+n as Megatron-LM drives megatron-core's scheduler: counted in
    samples (every count x global batch), stepped by the global batch after each iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class Opt:
        param_groups = [{}]

    decay = (decay_iters or train_iters) * GBS
    warmup = warmup_fraction * decay if warmup_fraction is not None else warmup_iters * GBS
    s = OptimizerParamScheduler(Opt(), init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=warmup,
                                lr_decay_steps=decay, lr_decay_style=style, start_wd=WD, end_wd=WD,
                                wd_incr_steps=train_iters * GBS, wd_incr_style="constant",
                                wsd_decay_steps=wsd_iters * GBS if wsd_iters else None, lr_wsd_decay_style=wsd_style)
    s.step(increment=start * GBS)
    out = []
    for _ in range(n):
        out.append(Opt.param_groups[0]["lr"])
        s.step(increment=GBS)
    return out


def tb_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "runs"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def norm(w: dict) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in w.values() if v.is_floating_point()))


SCHEDULES = {  # name: (iterations, flags, reference kwargs)
    "cosine": (6, ["--lr_warmup_iters", "2"], dict(style="cosine", warmup_iters=2)),
    "linear_decay_iters": (6, ["--lr_warmup_iters", "1", "--lr_decay_style", "linear", "--lr_decay_iters", "4"],
                           dict(style="linear", warmup_iters=1, decay_iters=4)),
    "constant": (4, ["--lr_warmup_iters", "2", "--lr_decay_style", "constant"], dict(style="constant", warmup_iters=2)),
    "inverse_sqrt": (6, ["--lr_warmup_iters", "2", "--lr_decay_style", "inverse-square-root"],
                     dict(style="inverse-square-root", warmup_iters=2)),
    "wsd": (8, ["--lr_warmup_iters", "1", "--lr_decay_style", "WSD", "--lr_wsd_decay_iters", "3",
                "--lr_wsd_decay_style", "linear"], dict(style="WSD", warmup_iters=1, wsd_iters=3, wsd_style="linear")),
    "warmup_fraction": (10, ["--lr_warmup_iters", "0", "--lr_warmup_fraction", "0.25"],
                        dict(style="cosine", warmup_fraction=0.25)),
    "one_iteration": (1, ["--lr_warmup_iters", "0"], dict(style="cosine")),
}
LOG_OFF = ["--log_params_norm", "false", "--log_throughput", "false", "--log_timers_to_tensorboard", "false",
           "--no_log_learning_rate_to_tensorboard", "true", "--log_validation_ppl_to_tensorboard", "false",
           "--log_memory_to_tensorboard", "false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("settings")
    init = tmp / "init"

    def ft(name, iters, *extra):
        return ["--load", str(init), "--finetune", "true", "--train_iters", str(iters), "--save", str(tmp / name),
                "--add_version", "false", "--save_interval", "100", *extra]

    def resume(name, load, iters, *extra):
        return ["--load", str(load), "--train_iters", str(iters), "--save", str(tmp / name), "--add_version",
                "false", "--save_interval", "100", *extra]

    jobs = [{"name": "init", "init_only": True, "flags": ["--save", str(init), "--add_version", "false",
                                                         "--no_initialization", "false"]}]
    jobs += [{"name": f"lr_{n}", "flags": ft(f"lr_{n}", it, *NO_STATE, *f)} for n, (it, f, _) in SCHEDULES.items()]
    base = tmp / "base"
    jobs += [
        {"name": "base", "flags": ft("base", 4)},
        {"name": "changed", "expect_error": "differs from this run's", "flags": resume("changed", base, 8)},
        {"name": "override", "flags": resume("override", base, 8, "--override_opt_param_scheduler", "true")},
        {"name": "keep", "flags": resume("keep", base, 8, "--use_checkpoint_opt_param_scheduler", "true")},
        {"name": "epochs", "num_samples": 20, "flags": ft("epochs", 10, *NO_STATE, "--max_epochs", "1")},
        {"name": "log_on", "valid": True, "flags": ft("log_on", 3, *NO_STATE, "--eval_interval", "2")},
        {"name": "log_off", "valid": True, "flags": ft("log_off", 3, *NO_STATE, "--eval_interval", "2", *LOG_OFF)},
        {"name": "dist3", "flags": ft("dist3", 3, *NO_STATE)},
        {"name": "legacy3", "flags": ft("legacy3", 3, *NO_STATE, "--ckpt_format", "torch")},
    ]
    for w in (0, 2):
        jobs.append({"name": f"workers{w}", "loader": {"n": 40, "log": str(tmp / f"reads{w}.txt")},
                     "flags": ft(f"workers{w}", 2, *NO_STATE, "--num_workers", str(w))})
    jobs.append({"name": "single", "loader": {"n": 40, "log": str(tmp / "reads_single.txt")},
                 "flags": ft("single", 2, *NO_STATE, "--num_workers", "0", "--dataloader_type", "single")})
    first = run_plan(tmp, "first", jobs, timeout=900)
    tp2 = ["--tensor_model_parallel_size", "2", "--use_distributed_optimizer", "false"]
    multi = run_plan(tmp, "tp2", [{"name": "tp2_dist", "flags": ft("tp2_dist", 3, *NO_STATE, *tp2)},
                                  {"name": "tp2_legacy", "flags": ft("tp2_legacy", 3, *NO_STATE, *tp2,
                                                                     "--ckpt_format", "torch")}], nproc=2, timeout=900)
    reshard(str(tmp / "dist3"), 1, 1, str(tmp / "resharded_torch"), fmt="torch", progress=False)
    later = [
        {"name": "from_dist", "flags": resume("from_dist", tmp / "dist3", 5, "--override_opt_param_scheduler", "true")},
        {"name": "from_legacy", "flags": resume("from_legacy", tmp / "legacy3", 5, "--override_opt_param_scheduler",
                                                "true")},
        {"name": "from_reshard", "flags": resume("from_reshard", tmp / "resharded_torch", 5,
                                                 "--override_opt_param_scheduler", "true")},
        {"name": "from_tp2_dist", "flags": resume("from_tp2_dist", tmp / "tp2_dist", 4, "--override_opt_param_scheduler",
                                                  "true")},
        {"name": "from_tp2_legacy", "flags": resume("from_tp2_legacy", tmp / "tp2_legacy", 4,
                                                    "--override_opt_param_scheduler", "true")},
        {"name": "no_detect", "expect_error": "auto_detect_ckpt_format = false",
         "flags": resume("no_detect", tmp / "legacy3", 5, "--auto_detect_ckpt_format", "false")},
    ]
    second = run_plan(tmp, "second", later, timeout=900)
    timeouts = run_plan(tmp, "timeouts", [{"name": "timeouts", "timeouts": True,
                                           "flags": ft("timeouts", 1, *NO_STATE, "--lr_warmup_iters", "0",
                                                     "--distributed_timeout_minutes", "7")}])
    return tmp, {**first, **multi, **second, **timeouts}


@pytest.mark.parametrize("name", SCHEDULES)
def test_lr_of_every_iteration_is_megatron_cores(runs, name):
    """The lr each iteration trains with (logging.jsonl) equals megatron-core's OptimizerParamScheduler
    driven as Megatron-LM drives it, for every decay style, warmup, lr_decay_iters and one iteration."""
    tmp, r = runs
    iters, _, ref = SCHEDULES[name]
    got = lrs(r[f"lr_{name}"]["save_dir"])
    want = megatron_lrs(iters, iters, **ref)
    assert len(got) == iters
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15), (name, got, want)
    if name == "one_iteration":
        assert got == [LR]  # the only step trains at the peak lr, not at 0


def test_resume_with_a_changed_schedule(runs):
    """Megatron-LM's rules: a changed schedule is refused unless override_opt_param_scheduler (this
    run's schedule from the checkpoint's step) or use_checkpoint_opt_param_scheduler (the old one)."""
    _, r = runs
    assert "lr_decay_iters 4 -> 8" in r["changed"]["error"]
    assert "--override_opt_param_scheduler true" in r["changed"]["error"]
    override, keep = lrs(r["override"]["save_dir"]), lrs(r["keep"]["save_dir"])
    assert r["override"]["iteration"] == r["keep"]["iteration"] == 8 and len(override) == 4
    for g, w in zip(override, megatron_lrs(4, 8, "cosine", warmup_iters=1, start=4)):
        assert g == pytest.approx(w, rel=1e-12)
    assert min(override) > MIN_LR  # not the old schedule's floor
    assert keep == pytest.approx(megatron_lrs(4, 4, "cosine", warmup_iters=1, start=4)) and set(keep) == {MIN_LR}


def test_max_epochs_stops_before_train_iters(runs):
    _, r = runs
    res = r["epochs"]
    assert res["iteration"] == 3  # ceil(20 samples / 8 per global batch): one epoch, not train_iters 10
    assert lrs(res["save_dir"]) == pytest.approx(megatron_lrs(3, 10, "cosine", warmup_iters=1))


def test_log_switches_decide_what_is_logged_and_written_to_tensorboard(runs):
    _, r = runs
    on, off = tb_scalars(r["log_on"]["save_dir"]), tb_scalars(r["log_off"]["save_dir"])
    for tag in ("train/lr", "train/params_norm", "train/tokens_per_s_per_gpu", "train/tflops_per_gpu",
                "memory/mem_rss_peak_gib", "timers/step_s", "timers/data_s", "timers/save_s", "val/ppl"):
        assert tag in on and tag not in off, tag
    assert {"train/loss", "train/grad_norm", "val/loss"} <= set(off)
    assert [s for s, _ in on["train/lr"]] == [1, 2, 3] and [s for s, _ in on["val/ppl"]] == [2, 3]
    on_rec, off_rec = records(r["log_on"]["save_dir"])[0], records(r["log_off"]["save_dir"])[0]
    assert {"params_norm", "tokens_per_s_per_gpu", "tflops_per_gpu"} <= set(on_rec)
    assert not {"params_norm", "tokens_per_s_per_gpu", "tflops_per_gpu"} & set(off_rec)
    assert "lr" in off_rec  # the switch is about TensorBoard only, as in Megatron-LM
    assert r["log_on"]["losses"] == r["log_off"]["losses"]  # logging does not change training
    args = json.loads((Path(r["log_off"]["save_dir"]) / "args.json").read_text())
    assert args["log"]["log_params_norm"] is False and args["rlhf"] == {}  # what ran, and nothing not built


def test_params_norm_is_the_norm_of_the_weights(runs):
    """The logged norm after the last step equals the L2 norm of the saved checkpoint, also at TP=2."""
    _, r = runs
    for name in ("log_on", "tp2_dist"):
        logged = records(r[name]["save_dir"])
        last = [x["params_norm"] for x in logged if "params_norm" in x][-1]
        # fp32 per-tensor norms summed in fp64, against fp64 over the saved tensors
        assert last == pytest.approx(norm(weights(r[name]["last_checkpoint"])), rel=1e-6), name
    tp1, tp2 = records(r["dist3"]["save_dir"]), records(r["tp2_dist"]["save_dir"])
    assert tp2[0]["params_norm"] == pytest.approx(tp1[0]["params_norm"], rel=1e-6)


def legacy_weights(ckpt_dir) -> dict:
    src = legacy.LegacySource(Path(ckpt_dir))
    return {k: src.get(k, None) if not k.startswith(legacy.LAYERS) else
            torch.stack([src.get(k, i) for i in range(src.num_layers)]) for k in src.tensors}, src


@pytest.mark.parametrize("legacy_run,dist_run,tp", [("legacy3", "dist3", 1), ("tp2_legacy", "tp2_dist", 2)])
def test_ckpt_format_torch_writes_megatron_lms_rank_files(runs, legacy_run, dist_run, tp):
    _, r = runs
    ckpt = Path(r[legacy_run]["last_checkpoint"])
    assert sorted(p.name for p in ckpt.iterdir()) == [f"mp_rank_{t:02d}" for t in range(tp)]
    assert (ckpt.parent / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".staging")]
    assert r[legacy_run]["losses"] == r[dist_run]["losses"]
    w, src = legacy_weights(ckpt)
    ref = weights(r[dist_run]["last_checkpoint"])
    assert (src.tp, src.pp) == (tp, 1) and src.meta.iteration == 3 and src.meta.consumed_train_samples == 3 * GBS
    assert src.meta.opt_param_scheduler["num_steps"] == 3
    assert w.keys() == ref.keys()
    for k, v in w.items():
        assert torch.equal(v, ref[k]), k


def test_either_format_loads_and_resumes_alike(runs):
    """A run resumed from the legacy files (ours, reshard's, or TP=2 ones loaded at TP=1) continues exactly
    like one resumed from the same weights in torch_dist (neither holds optimizer state)."""
    _, r = runs
    for a, b in (("from_dist", "from_legacy"), ("from_dist", "from_reshard"), ("from_tp2_dist", "from_tp2_legacy")):
        assert r[a]["iteration"] == r[b]["iteration"] and len(r[b]["losses"]) == r[b]["iteration"] - 3
        assert r[b]["losses"] == r[a]["losses"], (a, b)
    assert "is a torch checkpoint, but ckpt_format = 'torch_dist'" in r["no_detect"]["error"]


def reads(path) -> list:
    return [tuple(map(int, line.split())) for line in Path(path).read_text().splitlines()]


def test_num_workers_reads_in_worker_processes_and_dataloader_type(runs):
    tmp, r = runs
    main_pids = {p for p, _ in reads(tmp / "reads0.txt")}
    worker_pids = {p for p, _ in reads(tmp / "reads2.txt")}
    assert len(main_pids) == 1 and len(worker_pids) == 2 and not main_pids & worker_pids
    assert r["workers2"]["losses"] == r["workers0"]["losses"]  # same batches, read elsewhere
    assert [i for _, i in reads(tmp / "reads_single.txt")][:16] == list(range(16))  # single: dataset order
    assert [i for _, i in reads(tmp / "reads0.txt")][:16] != list(range(16))  # cyclic: shuffled


def test_every_process_group_gets_the_timeout(runs):
    _, r = runs
    timeouts = r["timeouts"]["probe"]["timeouts"]
    assert len(timeouts) > 10 and any("GLOO" in k for k in timeouts)  # megatron-core's groups, gloo ones too
    assert set(timeouts.values()) == {7 * 60.0}, timeouts
