"""Every user mistake ends in one line naming the file, key or flag (exit 2), tracebacks only with
--debug. `sft` showed tracebacks for data, checkpoint and config mistakes that prep/export turned into
one line (the dispatcher caught only ConfigError); under torchrun each rank printed its own and
torchrun added a ~40-line report."""
import errno

import pytest

from faultkit import error_line, hpctrain, sft_args
from hpctrain import errors

pytestmark = pytest.mark.slow


def test_sft_mistakes_are_one_line(tiny_mcore, tmp_path):
    _, mc = tiny_mcore
    save = tmp_path / "save"
    cases = {
        "dataset": (sft_args(mc, save, "--dataset", tmp_path / "nope.jsonl"), f"{tmp_path / 'nope.jsonl'} does not exist"),
        "load": (sft_args(tmp_path / "no_ckpt", save), f"--load {tmp_path / 'no_ckpt'}: no such file or directory"),
        "key": (sft_args(mc, save, "--lr_warmup_iter", "3"), "Did you mean 'lr_warmup_iters'"),
    }
    for name, (argv, expect) in cases.items():
        p = hpctrain(*argv)
        assert p.returncode == 2, (name, p.stderr[-3000:])
        assert expect in error_line(p, "sft"), name


def test_bad_hf_config_value_is_one_line(tiny_mcore, tmp_path):
    """A config.json value of the wrong type reaches the user as one line (the type check itself and
    the key it names belong to the model families: hpctrain/model/families)."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_mcore[1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (bad / "config.json").write_text(json.dumps(cfg))
    p = hpctrain(*sft_args(bad, tmp_path / "save"))
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p, "sft")
    assert str(bad) in line and "num_hidden_layers" in line and "'two'" in line, line


def test_torchrun_ranks_give_one_line_and_no_torchrun_report(tiny_mcore, tmp_path):
    _, mc = tiny_mcore
    missing = tmp_path / "nope.jsonl"
    p = hpctrain(*sft_args(mc, tmp_path / "save", "--dataset", missing), env={"NPROC_PER_NODE": "2"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"{missing} does not exist" in error_line(p, "sft")
    assert "ChildFailedError" not in p.stderr and "Root Cause" not in p.stderr


def test_debug_shows_the_traceback(tiny_mcore, tmp_path):
    p = hpctrain(*sft_args(tiny_mcore[1], tmp_path / "save", "--dataset", tmp_path / "nope.jsonl"), "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr and "DataError" in p.stderr


def test_other_commands_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for argv, command, expect in (
            (["export", "--model", tmp_path / "empty", "--to_mcore", "true", "--output_dir", tmp_path / "o"],
             "export", "no config.json"),
            (["reshard", tmp_path / "empty", "--tp", "1", "--pp", "1", "--out", tmp_path / "o"],
             "reshard", "no complete checkpoint"),
            (["infer", "--model", tmp_path / "nope", "--query", "hi"], "infer", "no such file or directory")):
        p = hpctrain(*argv)
        assert p.returncode in (1, 2), (argv, p.stderr[-2000:])
        assert expect in error_line(p, command), argv


class _CheckpointException(BaseException):
    """Shaped like torch's: a BaseException with per-rank (exception, frames) failures."""

    def __init__(self, failures):
        super().__init__("CheckpointException ranks:dict_keys([0])")
        self.failures = failures


def test_describe_maps_failures_to_exit_codes():
    user = errors.UserError("config.json: hidden_size must be an integer")
    assert errors.describe(user) == (2, "config.json: hidden_size must be an integer")
    assert errors.describe(_CheckpointException({0: (user, [])})) == (2, str(user))
    full = OSError(errno.ENOSPC, "No space left on device", "/ckpt/__0_0.distcp")
    code, line = errors.describe(_CheckpointException({0: (RuntimeError("writer failed"), [])}))
    assert code == 1 and "rerun with --debug" in line
    code, line = errors.describe(_CheckpointException({1: (full, [])}))
    assert (code, line) == (1, "no space left on device writing /ckpt/__0_0.distcp; free space or choose "
                               "another folder")
    assert errors.describe(FileNotFoundError("x.jsonl: no such file"))[0] == 2
