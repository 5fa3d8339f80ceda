"""Outputs of export and reshard, and the files later commands read.

* ``--overwrite`` never removes (or writes into) a folder that is, holds or lies inside the input:
  `export --overwrite true` used to delete its own input when --output_dir was the input or a parent.
* reshard's refusals name only flags reshard takes (--out, --overwrite; not --output_dir).
* `export --to_hf` killed after config.json left a 0-byte tokenizer_config.json that the next export
  copied on and `sft` then died on with a JSONDecodeError naming no file: now the output is built in
  a partial folder and renamed into place when complete, and a damaged JSON anywhere is one line
  naming the file.
* A missing tokenizer gave "has no chat template" (sft) / "cannot reshape tensor of 0 elements"
  (infer): now one line naming the folder.
"""
import os
import shutil
import subprocess
import sys

import pytest

from faultkit import ROOT, _env, error_line, hpctrain, sft_args
from hpctrain.checkpoint import layout
from hpctrain.checkpoint.export import run as export
from hpctrain.checkpoint.reshard import run as reshard


def one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hpctrain ")]
    assert len(err) == 1, err
    return err[0]


def test_overwrite_never_removes_the_input(tiny_mcore, tmp_path, capsys):
    hf, mc = tiny_mcore
    before = {p: sorted(os.listdir(p)) for p in (hf, mc, mc / "release")}
    for argv in (["--model", hf, "--to_mcore", "true", "--output_dir", hf],
                 ["--model", hf, "--to_mcore", "true", "--output_dir", hf.parent],
                 ["--mcore_model", mc, "--to_hf", "true", "--output_dir", mc],
                 ["--mcore_model", mc, "--to_hf", "true", "--output_dir", mc.parent],
                 ["--mcore_model", mc, "--to_hf", "true", "--output_dir", mc / "release"]):
        assert export([*map(str, argv), "--overwrite", "true", "--no_progress"]) == 1
        line = one_line(capsys)
        assert "--output_dir" in line and ("is or holds the input" in line or "lies inside the input" in line)
    for argv in ([mc, "--out", mc], [mc, "--out", mc.parent], [mc / "release", "--out", mc / "release"]):
        assert reshard([*map(str, argv), "--tp", "1", "--pp", "1", "--overwrite", "--no_progress"]) == 1
        line = one_line(capsys)
        assert "--out " in line and "--output_dir" not in line and "--overwrite true" not in line, line
    assert {p: sorted(os.listdir(p)) for p in (hf, mc, mc / "release")} == before
    assert layout.is_complete(mc)
    # a new folder next to the checkpoint's files (not one of them) is fine
    assert export(["--mcore_model", str(mc), "--to_hf", "true", "--output_dir", str(mc / "hf"), "--no_progress"]) == 0
    shutil.rmtree(mc / "hf")


def test_reshard_existing_output_names_its_own_flags(tiny_mcore, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    assert reshard([str(tiny_mcore[1]), "--tp", "1", "--pp", "1", "--out", str(out), "--no_progress"]) == 1
    line = one_line(capsys)
    assert "pass --overwrite to replace it or choose another --out" in line, line
    assert (out / "x").read_text() == "x"


KILL_AFTER_CONFIG = """
import os, sys
from hpctrain.checkpoint import hf_io
hf_io.copy_tokenizer_files = lambda *a, **k: os._exit(137)   # killed right after config.json
from hpctrain.checkpoint.export import run
run(sys.argv[1:])
"""


@pytest.mark.slow
def test_export_killed_after_config_leaves_nothing_and_damaged_json_is_named(tiny_mcore, tmp_path):
    mc, hf = tiny_mcore[1], tmp_path / "hf"
    argv = ["--mcore_model", str(mc), "--to_hf", "true", "--output_dir", str(hf), "--no_progress"]
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_CONFIG, *argv], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 137
    partial = list(tmp_path.glob(".hf.partial-*"))
    assert len(partial) == 1 and (partial[0] / "config.json").is_file()  # what the kill left...
    assert not hf.exists()  # ...never under the output's name
    p = hpctrain("export", *argv)  # the next export: a complete output, the dead run's partial gone
    assert p.returncode == 0, p.stderr[-3000:]
    assert (hf / "tokenizer_config.json").stat().st_size == (mc / "tokenizer_config.json").stat().st_size
    assert not list(tmp_path.glob(".hf.*"))
    # a damaged JSON file (as the old kill left) is one line naming it, in every command that reads it
    (hf / "tokenizer_config.json").write_text("")
    p = hpctrain("export", "--model", hf, "--to_mcore", "true", "--output_dir", tmp_path / "mc2", "--no_progress")
    assert f"{hf / 'tokenizer_config.json'} is empty (0 bytes)" in error_line(p, "export")
    p = hpctrain("infer", "--model", hf, "--query", "hi", "--max_new_tokens", "2")
    assert p.returncode == 2 and f"{hf / 'tokenizer_config.json'} is empty" in error_line(p, "infer")
    damaged = tmp_path / "damaged"
    shutil.copytree(mc, damaged)
    (damaged / "config.json").write_text('{"hidden_size": 32,')
    p = hpctrain(*sft_args(damaged, tmp_path / "save"))
    assert p.returncode == 2 and f"{damaged / 'config.json'} is not valid JSON" in error_line(p, "sft")


@pytest.mark.slow
def test_missing_tokenizer_is_one_line(tiny_mcore, tmp_path):
    hf, mc = tiny_mcore
    bare_hf, bare_mc = tmp_path / "bare_hf", tmp_path / "bare_mc"
    for src, dst in ((hf, bare_hf), (mc, bare_mc)):
        shutil.copytree(src, dst)
        for f in dst.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens"))):
                f.unlink()
    p = hpctrain(*sft_args(bare_mc, tmp_path / "save"))
    assert p.returncode == 2 and f"{bare_mc} has no tokenizer" in error_line(p, "sft")
    p = hpctrain("infer", "--model", bare_hf, "--query", "hi", "--max_new_tokens", "2")
    assert p.returncode == 2 and f"{bare_hf} has no tokenizer" in error_line(p, "infer")
