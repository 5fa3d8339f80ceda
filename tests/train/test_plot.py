"""The training-curves PNG (hpctrain/train/plot.py): its panels hold exactly the logged train and
validation loss, learning rate, grad norm and throughput per iteration; `hpctrain plot` draws a
run that is still being written (half a line at the end), a resumed run (last record of an
iteration wins), a save root (newest version), and says how to get matplotlib when it is absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain.train import plot

ROOT = Path(__file__).resolve().parents[2]


def _records():
    recs = []
    for it in range(1, 9):
        recs.append(dict(iteration=it, loss=3.0 - 0.2 * it, lr=1e-5 * it / 8, grad_norm=1.0 + it,
                         tokens=100, tokens_per_s_per_gpu=1000.0 + 10 * it, skipped=False))
        if it % 4 == 0:
            recs.append(dict(iteration=it, val_loss=2.9 - 0.1 * it, val_ppl=10.0))
    return recs


def _write(run: Path, recs, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    log = run / "logging.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return log


def test_series_and_figure_hold_every_logged_value(tmp_path):
    recs = _records()
    log = _write(tmp_path / "v0-20260101-000000", recs, tail='{"iteration": 9, "loss": 1.')  # still writing
    data = plot.series(plot.read_records(log))
    train = [r for r in recs if "loss" in r]
    assert data["train_loss"] == ([r["iteration"] for r in train], [r["loss"] for r in train])
    assert data["val_loss"] == ([4, 8], [2.9 - 0.4, 2.9 - 0.8])
    assert data["lr"][1] == [r["lr"] for r in train]
    assert data["grad_norm"][1] == [r["grad_norm"] for r in train]
    assert data["throughput"][1] == [r["tokens_per_s_per_gpu"] for r in train]

    fig = plot.draw(data)
    panels = {ax.get_ylabel(): {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
              for ax in fig.axes}
    assert set(panels) == {"loss", "learning rate", "grad norm", "tokens/s per GPU"}
    assert panels["loss"]["train"] == data["train_loss"] and panels["loss"]["validation"] == data["val_loss"]
    assert panels["learning rate"]["lr"] == data["lr"]
    assert panels["grad norm"]["grad norm"] == data["grad_norm"]
    assert panels["tokens/s per GPU"]["tokens/s/GPU"] == data["throughput"]
    assert fig.axes[-1].get_xlabel() == "iteration"


def test_a_resumed_run_keeps_the_last_record_of_each_iteration(tmp_path):
    recs = _records()[:6] + [dict(iteration=4, loss=9.0, lr=1.0, grad_norm=1.0, tokens_per_s_per_gpu=1.0)]
    data = plot.series(plot.read_records(_write(tmp_path / "run", recs)))
    its, losses = data["train_loss"]
    assert its == sorted(set(its)) and losses[its.index(4)] == 9.0


def _cli(args, extra_path=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)}
    return subprocess.run([sys.executable, "-m", "hpctrain", "plot", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_plot_command_draws_the_newest_run_of_a_save_root(tmp_path):
    _write(tmp_path / "save" / "v0-20260101-000000", _records()[:3])
    _write(tmp_path / "save" / "v1-20260102-000000", _records())
    r = _cli([str(tmp_path / "save")])
    assert r.returncode == 0, r.stderr
    png = tmp_path / "save" / "v1-20260102-000000" / "train_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in r.stdout
    r = _cli([str(tmp_path / "save"), "--output", str(tmp_path / "c.png")])
    assert r.returncode == 0 and (tmp_path / "c.png").stat().st_size > 1000


def test_plot_command_errors(tmp_path):
    r = _cli([str(tmp_path)])
    assert r.returncode == 2 and "no logging.jsonl" in r.stderr and "Traceback" not in r.stderr
    # matplotlib absent: a module that fails to import shadows it for the child
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    _write(tmp_path / "run", _records())
    r = _cli([str(tmp_path / "run")], extra_path=str(tmp_path))
    assert r.returncode == 2 and "pip install 'hpctrain[plot]'" in r.stderr


def test_logger_close_does_not_raise_when_the_png_cannot_be_written(tmp_path, caplog):
    """A full disk at the end must not replace the save error the trainer is raising."""
    from hpctrain.config import JobConfig
    from hpctrain.train.logger import TrainLogger

    logger = TrainLogger(JobConfig(), str(tmp_path / "run"), 1, True, 8)
    _write(tmp_path / "run", _records())
    logger.history.append({})
    (tmp_path / "run" / "train_loss.png").mkdir()  # savefig fails with an OSError, as on a full disk
    logger.close()
    assert "could not write the training-curves PNG" in caplog.text


@pytest.mark.parametrize("name", ["logging.jsonl", None])
def test_find_log_accepts_the_file_or_its_folder(tmp_path, name):
    log = _write(tmp_path / "run", _records())
    assert plot.find_log(log if name else log.parent) == log
