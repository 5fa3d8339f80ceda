"""A full disk. A save that ran out of space ended in rc 1 and a 160-line traceback whose last
exception came from drawing train_loss.png (hiding the cause); `export --to_hf` gave a raw
SafetensorError. Now: one line with the cause and the checkpoint that stays the latest, and that
checkpoint is intact (a resumed run continues from it).

The disk is a small tmpfs mounted for the test (root can mount one on the CI machine) and filled
to a few hundred KB; where no tmpfs can be mounted, a file-size limit (RLIMIT_FSIZE: writes past it
fail with EFBIG, "File too large") stands in for it (FAULTS_NO_TMPFS=1 forces that path).
"""
import os
import resource
import shutil
import subprocess
import uuid

import pytest

from faultkit import TOKENIZER, error_line, hpctrain, save_flags, trainer
from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader

pytestmark = pytest.mark.slow
LEFT_FREE = 300 * 1024


def _mount_tmpfs(path) -> bool:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture
def small_disk(tmp_path):
    """(folder, fill, limits): fill() leaves LEFT_FREE bytes on the tmpfs (no-op under the limit);
    ``limits`` is the preexec_fn that sets RLIMIT_FSIZE when there is no tmpfs (else None)."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mounted = not os.environ.get("FAULTS_NO_TMPFS") and _mount_tmpfs(disk)
    disk.mkdir(exist_ok=True)

    def fill():
        if mounted:
            st = os.statvfs(disk)
            with open(disk / "filler", "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(st.f_bavail * st.f_frsize - LEFT_FREE, 0))

    def limits():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LEFT_FREE, LEFT_FREE))

    yield disk, fill, None if mounted else limits
    if mounted:
        subprocess.run(["umount", str(disk)], check=False, timeout=60)


def test_save_on_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    disk, fill, limits = small_disk
    save = disk / "save"
    p = trainer(*save_flags(save, iters=2, interval=2))
    assert p.returncode == 0, p.stderr[-3000:]
    fill()
    p = trainer("--load", save, *save_flags(save, iters=4, interval=2), preexec_fn=limits)
    assert p.returncode == 1, p.stderr[-3000:]
    line = error_line(p, "sft")
    cause = "no space left on device" if limits is None else "file too large"
    assert f"saving iteration 4 to {save} failed: {cause}" in line, line
    assert f"the latest complete checkpoint is still {save / 'iter_0000002'} (iteration 2)" in line
    ref = layout.find_latest(save)
    assert ref.iteration == 2
    reader = DcpReader(ref.path)
    for key in reader.tensor_keys():
        reader.read(key)  # every tensor of the previous checkpoint is there
    (disk / "filler").unlink(missing_ok=True)
    p = trainer("--load", save, *save_flags(save, iters=4, interval=2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert layout.find_latest(save).iteration == 4


@pytest.fixture
def mcore_small(tmp_path):
    """A 2-layer Qwen2 (vocab 4096, ~2 MB) converted to mcore: larger than the space left."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf, mc = tmp_path / "hf-src", tmp_path / "mcore"
    cfg = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(hf)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, hf / f.name)
    p = hpctrain("export", "--model", hf, "--to_mcore", "true", "--output_dir", mc, "--no_progress")
    assert p.returncode == 0, p.stderr[-3000:]
    return mc


def test_export_to_hf_on_a_full_disk_is_one_line(small_disk, mcore_small):
    disk, fill, limits = small_disk
    fill()
    out = disk / "hf"
    p = hpctrain("export", "--mcore_model", mcore_small, "--to_hf", "true", "--output_dir", out,
                 "--no_progress", preexec_fn=limits)
    assert p.returncode == 1, p.stderr[-3000:]
    line = error_line(p, "export")
    cause = "no space left on device" if limits is None else "file too large"
    assert line.startswith(f"hpctrain export: {cause} writing {disk}/.hf.partial-") and "shard-00000.tmp" in line, line
    assert "SafetensorError" not in p.stderr
    assert not out.exists() and not list(disk.glob(".hf.*"))  # the partial output was removed
