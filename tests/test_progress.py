"""Progress that reaches a batch log (hpctrain/progress.py): when stderr is not a terminal, a line
every HPCTRAIN_PROGRESS_INTERVAL seconds with count, rate and ETA, and a last line - for the
tokenizing of prep, HF -> mcore conversion, reshard and training. The commands run as
subprocesses with stderr on a pipe, as under sbatch."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
SC = str(ROOT / "hpctrain" / "assets" / "data" / "self_cognition.jsonl")
LINE = re.compile(r"^(?P<desc>[\w ]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>[\w ]+) \(\d+%\) \| [\d.]+ [\w ]+/s \| "
                  r"elapsed \d+:\d\d:\d\d( \| eta \d+:\d\d:\d\d)?( \| (done|stopped))?$")


class Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_lines_every_interval_with_count_rate_eta_and_a_last_line():
    out = io.StringIO()  # not a terminal
    with Progress(100, "tokenize", "rows", stream=out, interval=10, clock=Clock(4.0)) as bar:
        for _ in range(10):
            bar.update(10)
    lines = out.getvalue().splitlines()
    # the clock moves 4 s per call from t=4: lines after 30, 60, 90 rows (12, 24, 36 s), then the last one (at close, t=48)
    assert len(lines) == 4, lines
    assert all(LINE.match(x) for x in lines), lines
    assert lines[0] == "tokenize: 30/100 rows (30%) | 2.50 rows/s | elapsed 0:00:12 | eta 0:00:28"
    assert lines[-1] == "tokenize: 100/100 rows (100%) | 2.27 rows/s | elapsed 0:00:44 | eta 0:00:00 | done"


def test_a_resumed_count_rates_only_the_new_work_and_an_error_says_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(100, "train", "iterations", initial=50, stream=out, interval=0, clock=Clock(1.0)) as bar:
            bar.update(1)
            raise RuntimeError("boom")
    first, last = out.getvalue().splitlines()
    assert first.startswith("train: 51/100 iterations (51%) | 1.00 iterations/s") and "eta 0:00:49" in first
    assert last.endswith("| stopped")


def test_terminal_redraws_one_line_and_disabled_prints_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress(3, "x", stream=tty, clock=Clock(1.0)) as bar:
        bar.update(1)
    assert tty.getvalue().startswith("\rx: 1/3 it") and tty.getvalue().count("\n") == 1
    quiet = io.StringIO()
    with Progress(3, "x", stream=quiet, enabled=False, interval=0) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def _run(args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "HPCTRAIN_PROGRESS_INTERVAL": "0"}
    r = subprocess.run([sys.executable, "-m", "hpctrain", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return [x for x in r.stderr.splitlines() if LINE.match(x)]


def _check(lines, desc, unit, total=None):
    ours = [x for x in lines if x.startswith(desc + ":")]
    assert len(ours) >= 2, lines  # lines while running, then the last one (at close, t=48)
    m = LINE.match(ours[-1])
    assert m["unit"] == unit and ours[-1].endswith("| done") and m["n"] == m["total"]
    if total is not None:
        assert int(m["total"]) == total
    assert any(" | eta " in x for x in ours[:-1])


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    # Qwen2.5's own vocab_size (the tokenizer's ids fit; TP=2 divides it)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=256)).save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def test_prep_conversion_and_reshard_print_progress_lines_in_a_batch_log(tiny_hf, tmp_path):
    _check(_run(["prep", "--model", str(TOKENIZER), "--dataset", f"{SC}#40", "--prep_dir", str(tmp_path / "p"),
                 "--model_name", "小黄", "Bot", "--model_author", "魔搭", "Acme"]), "tokenize train", "rows", 40)
    _check(_run(["export", "--model", str(tiny_hf), "--to_mcore", "true", "--output_dir", str(tmp_path / "m")]),
           "to_mcore", "tensors")
    _check(_run(["reshard", str(tmp_path / "m"), "--tp", "2", "--pp", "1", "--out", str(tmp_path / "r"),
                 "--format", "torch"]), "reshard", "rank files", 2)
    _check(_run(["export", "--mcore_model", str(tmp_path / "m"), "--to_hf", "true", "--output_dir",
                 str(tmp_path / "h")]), "to_hf", "layers", 2)


def test_training_prints_progress_lines_in_a_batch_log(tiny_hf, tmp_path):
    _run(["export", "--model", str(tiny_hf), "--to_mcore", "true", "--output_dir", str(tmp_path / "m")])
    lines = _run(["sft", "--load", str(tmp_path / "m"), "--dataset", f"{SC}#16", "--model_name", "小黄", "Bot",
                  "--model_author", "魔搭", "Acme", "--train_iters", "3", "--global_batch_size", "4",
                  "--micro_batch_size", "2", "--max_length", "128", "--save", str(tmp_path / "s"),
                  "--finetune", "true", "--log_interval", "100"])
    _check(lines, "train", "iterations", 3)
