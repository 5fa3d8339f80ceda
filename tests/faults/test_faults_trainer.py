"""The trainer under faults (hpctrain sft through the real CLI on synthetic data, one process).

* A requeued run with nothing left to train exits 0 without saving (it used to rewrite the only
  complete checkpoint in place: killed during that, the tracker named a 44 KB shard).
* A save onto the tracker's own iteration goes to ``<iter>.next`` and is swapped in by two renames;
  kill -9 while its files are written, before the swap, and between the two renames: a complete
  checkpoint is always found, and the resumed run's losses equal an uninterrupted run's (bitwise).
* Killing only the trainer PID while megatron-core's forked checkpoint writer runs leaves no process.
* A non-finite loss names the checkpoint to resume from, and warns when that one already holds the
  weights that produced the value (save_interval 1).
* fp16 with every step so far skipped (loss-scale overflow) saves (it died with a bare AssertionError
  in megatron-core's distrib_optimizer.state_dict) and resumes.
"""
import os
import shutil
import signal
import time

import psutil
import pytest

from faultkit import losses, save_flags, start_trainer, trainer, wait_for
from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader

pytestmark = pytest.mark.slow


def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run to iteration 6 (saved at 6), and its continuation to 8 (the reference losses)."""
    tmp = tmp_path_factory.mktemp("trainer_faults")
    six, eight = tmp / "six", tmp / "eight"
    ok(trainer(*save_flags(six, interval=6)))
    shutil.copytree(six, eight)
    ok(trainer("--load", eight, *save_flags(eight, iters=8, interval=100)))
    return tmp, six, losses(eight)


def files_state(ckpt):
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) for f in ckpt.iterdir()}


def test_requeued_run_with_nothing_left_exits_0_without_saving(straight, tmp_path):
    _, six, _ = straight
    save = tmp_path / "requeued"
    shutil.copytree(six, save)
    before = files_state(save / "iter_0000006")
    p = ok(trainer("--load", save, *save_flags(save, interval=6)))  # what the requeued job runs
    assert "nothing to train" in p.stderr
    assert files_state(save / "iter_0000006") == before
    assert sorted(d.name for d in save.iterdir() if d.name.startswith("iter_")) == ["iter_0000006"]


@pytest.mark.parametrize("moment", ["writing", "before_swap", "between_renames"])
def test_kill9_while_replacing_the_current_checkpoint(straight, tmp_path, moment):
    _, six, reference = straight
    save = tmp_path / "save"
    shutil.copytree(six, save)  # tracker 6: this run's save of iteration 6 replaces that checkpoint
    nxt, prev = layout.replacement_dirs(save / "iter_0000006")
    hook, ready = {
        "writing": ({"FAULT_SLOW_WRITER": "60"}, lambda: nxt.is_dir()),
        "before_swap": ({"HPCTRAIN_FAULT_PAUSE_BEFORE_TRACKER": "60"}, lambda: (nxt / "metadata.json").is_file()),
        "between_renames": ({"HPCTRAIN_FAULT_PAUSE_IN_REPLACE": "60"}, lambda: prev.is_dir()),
    }[moment]
    p = start_trainer(*save_flags(save, interval=6), env=hook)
    wait_for(ready, proc=p)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)  # the trainer and its writer processes
    p.communicate(timeout=60)
    ref = layout.find_latest(save)
    assert ref is not None and ref.iteration == 6
    assert "embedding.word_embeddings.weight" in DcpReader(ref.path).tensor_keys()
    ok(trainer("--load", save, *save_flags(save, iters=8, interval=100)))
    got = losses(save)
    assert [got[7], got[8]] == [reference[7], reference[8]]  # bitwise on CPU
    assert layout.find_latest(save).iteration == 8
    assert not list(save.glob("iter_*.next")) and not list(save.glob("iter_*.prev"))


def test_killing_the_trainer_pid_leaves_no_writer_behind(tmp_path):
    save = tmp_path / "save"
    p = start_trainer(*save_flags(save, iters=2, interval=2), env={"FAULT_SLOW_WRITER": "60"})
    trainer_proc = psutil.Process(p.pid)
    wait_for(lambda: trainer_proc.children(recursive=True), proc=p)
    children = trainer_proc.children(recursive=True)
    os.kill(p.pid, signal.SIGKILL)  # only the trainer
    p.communicate(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left behind: {[c.cmdline() for c in alive]}"


@pytest.mark.parametrize("interval", [1, 2])
def test_nonfinite_loss_names_the_checkpoint_to_resume_from(tmp_path, interval):
    save = tmp_path / "save"
    p = trainer(*save_flags(save, interval=interval), env={"FAULT_NAN_AT": "4"})
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    line = next(ln for ln in p.stderr.splitlines() if "non-finite" in ln)
    assert "iteration 4: loss is nan" in line
    if interval == 1:  # iteration 3's checkpoint holds the weights that gave the NaN at 4
        assert f"Warning: the last checkpoint saved before it, {save / 'iter_0000003'} (iteration 3), " \
               "already holds the weights" in line
        assert f"--load {save / 'iter_0000002'}" in line
    else:
        assert f"The last checkpoint saved before it is {save / 'iter_0000002'} (iteration 2)" in line
        assert "Warning" not in line
    assert layout.find_latest(save).iteration == 4 - interval


def test_fp16_with_every_step_skipped_saves_and_resumes(tmp_path):
    fp16 = ["--torch_dtype", "float16", "--initial_loss_scale", "4294967296"]
    save = tmp_path / "save"
    ok(trainer(*save_flags(save, *fp16, iters=2, interval=2)))
    assert layout.find_latest(save).iteration == 2
    skipped = [r for r in (save / "logging.jsonl").read_text().splitlines() if '"skipped": true' in r]
    assert len(skipped) == 2  # every step so far overflowed: the optimizer has no Adam state yet
    ok(trainer("--load", save, *save_flags(save, *fp16, iters=3, interval=100)))
    assert layout.find_latest(save).iteration == 3
