"""The quickstart orchestrator's own logic (fast; the pipeline itself is in test_quickstart.py)."""
from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import threading
from pathlib import Path

import pytest

from hpctrain import quickstart as qs


@pytest.mark.parametrize("micro,global_,dp,expect", [
    (4, 8, 1, (4, 8)), (4, 8, 2, (4, 8)), (4, 8, 4, (2, 8)), (4, 8, 8, (1, 8)), (4, 8, 3, (2, 12)), (4, 2, 4, (1, 4)),
])
def test_batch_sizes_fit_data_parallel(micro, global_, dp, expect):
    m, g = qs.batch_sizes(micro, global_, dp)
    assert (m, g) == expect and g % (m * dp) == 0


def test_echo_collapses_progress_bars():
    log, lines = io.StringIO(), []
    echo = qs._Echo(log, lines, threading.Lock())
    for chunk in ["start\nbar 1%\r", "bar 50%\rbar 10", "0%\n", "a\r\nb", "c\r", "\ntail"]:
        echo.feed(chunk)
    echo.flush_line()
    assert lines == ["start", "bar 100%", "a", "bc", "tail"]
    assert log.getvalue() == "start\nbar 100%\na\nbc\ntail\n"


def test_sft_command_carries_the_seed_flags(tmp_path):
    opts = qs._parser().parse_args(["--train_iters", "7", "--alpaca", "0"])
    argv = qs.sft_argv(opts, tmp_path, "float32", ["--lr_decay_style", "constant"], nproc=2)
    assert argv[:4] == [sys.executable, "-m", "hpctrain", "sft"]
    text = " ".join(argv)
    assert f"--load {tmp_path / 'mcore'}" in text and "--finetune true" in text
    names = tmp_path / "data" / "self_cognition_names.jsonl"
    # alpaca 0: left out; the rows that state the name, four more times
    assert f"--dataset swift/self-cognition#134 {names}#148 --model_name" in text
    rows = [json.loads(x) for x in names.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 37 and all("{{NAME}}" in r["response"] for r in rows)
    assert "--model_name hpctrain-bot --model_author hpctrain" in text
    assert "--system 'You are a helpful assistant.'" in shlex.join(argv)
    assert "--train_iters 7" in text and "--save_interval 7" in text
    assert argv[-2:] == ["--lr_decay_style", "constant"]
    # the flags parse with the real config loader
    from hpctrain.config import config_from_argv
    cfg = config_from_argv(argv[4:], mode="sft")
    assert cfg.data.model_name == ["hpctrain-bot"] and cfg.train.train_iters == 7
    assert cfg.data.system == "You are a helpful assistant."
    # the same prompt is asked with, before and after; '' leaves the template's own everywhere
    assert qs._infer_argv("m", opts)[-2:] == ["--system", "You are a helpful assistant."]
    bare = qs._parser().parse_args(["--system", ""])
    assert "--system" not in qs.sft_argv(bare, tmp_path, "float32", [], 1) + qs._infer_argv("m", bare)


def test_losses_and_answer_parsing(tmp_path):
    out = "[05:00:35] iter 1/2 | loss 2.2992 | lr 0\n[05:00:36] iter 2/2 | loss 1.5 | lr 1e-4\n"
    assert qs.losses(None, out) == [2.2992, 1.5]
    run = tmp_path / "v0-x"
    run.mkdir()
    (run / "logging.jsonl").write_text('{"iteration": 1, "loss": 3.0}\n{"iteration": 1, "val_loss": 9}\n')
    assert qs.losses(run, out) == [3.0]
    st = qs.Stage("after", "t", [], returncode=0, stdout="I am hpctrain-bot, made by hpctrain.\n")
    assert qs.answer_of(st) == "I am hpctrain-bot, made by hpctrain."
    assert qs.names_model(qs.answer_of(st), ["小黄", "HPCtrain-Bot"])
    assert not qs.names_model("I am SmolLM", ["小黄", "hpctrain-bot"])


def test_latest_run_needs_the_tracker(tmp_path):
    assert qs.latest_run(tmp_path) is None
    (tmp_path / "v0-20260101-000000").mkdir()
    assert qs.latest_run(tmp_path) is None  # no tracker: an unfinished run
    (tmp_path / "v0-20260101-000000" / "latest_checkpointed_iteration.txt").write_text("2")
    assert qs.latest_run(tmp_path) == tmp_path / "v0-20260101-000000"


def test_workdir_must_be_empty_unless_overwrite(tmp_path):
    (tmp_path / "junk").write_text("x")
    opts = argparse.Namespace(workdir=str(tmp_path), overwrite=False)
    with pytest.raises(SystemExit, match="not empty"):
        qs.prepare_workdir(opts)
    opts.overwrite = True
    assert qs.prepare_workdir(opts) == tmp_path.resolve() and not (tmp_path / "junk").exists()
    assert (tmp_path / "logs").is_dir()


def test_lora_pipeline_exports_the_adapter_and_asks_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(qs, "_device_plan", lambda opts: (2, "float32", {"NPROC_PER_NODE": "2"}))
    opts, extra = qs._parser().parse_known_args(["--train_type", "lora", "--lora_rank", "4"])
    stages = {s.key: s for s in qs.build_stages(opts, tmp_path, "m.gguf", extra)}
    sft = " ".join(stages["sft"].argv)
    assert "--train_type lora --lora_rank 4 --lora_alpha 32" in sft and "--lr 0.003" in sft
    assert "--test_convert_precision" not in stages["to_hf"].argv  # it compares full models
    assert stages["after"].argv[-2:] == ["--adapters", str(tmp_path / "hf")] and "m.gguf" in stages["after"].argv
    from hpctrain.config import config_from_argv
    assert config_from_argv(stages["sft"].argv[4:], mode="sft").tuner.lora_rank == 4
