"""Qwen3-MoE conversion at any layout, and `hpctrain reshard` across EP sizes.

HF -> mcore -> HF is bit-exact (tests/checkpoint/test_convert_roundtrip.py covers both MoE kinds);
here the converted checkpoints, and `hpctrain reshard --ep` copies of them, load at TP=1, EP=2,
TP=2 (experts split by ETP = TP) and PP=2 (2 gloo processes) and give transformers' logits
(fp32: max abs diff < 1e-3, same argmax): `python -m hpctrain.checkpoint.precision --layout TPxPPxEP`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_hf import make_tiny

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader
from hpctrain.checkpoint.export import run as export
from hpctrain.checkpoint.reshard import run as reshard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_convert")
    out = {}
    for kind in ("qwen3_moe", "qwen3_moe_mixed"):
        hf = make_tiny(kind, tmp / kind)
        assert export(["--model", str(hf), "--to_mcore", "true", "--output_dir", str(tmp / f"{kind}-mc"),
                       "--no_progress"]) == 0
        out[kind] = (hf, tmp / f"{kind}-mc")
    return tmp, out


def test_expert_tensors_have_megatrons_layout(converted):
    _, out = converted
    stacked = DcpReader(layout.require_latest(out["qwen3_moe"][1]).path)
    assert stacked.shape("decoder.layers.mlp.experts.experts.linear_fc1.weight") == (2, 4, 64, 64)
    assert stacked.shape("decoder.layers.mlp.experts.experts.linear_fc2.weight") == (2, 4, 64, 32)
    assert stacked.shape("decoder.layers.mlp.router.weight") == (2, 4, 64)
    mixed = DcpReader(layout.require_latest(out["qwen3_moe_mixed"][1]).path)  # per-layer names
    assert mixed.shape("decoder.layers.0.mlp.linear_fc1.weight") == (192, 64)
    assert mixed.shape("decoder.layers.1.mlp.experts.experts.linear_fc1.weight") == (4, 64, 64)
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in mixed.keys()


def test_reshard_refuses_an_ep_that_does_not_divide_the_experts(converted, tmp_path, capsys):
    _, out = converted
    assert reshard([str(out["qwen3_moe"][1]), "--tp", "1", "--pp", "1", "--ep", "3", "--out",
                    str(tmp_path / "x"), "--no_progress"]) == 1
    assert "expert_model_parallel_size=3 does not divide num_experts=4" in capsys.readouterr().err
    assert reshard([str(out["qwen3_moe"][1]), "--tp", "1", "--pp", "1", "--format", "torch", "--out",
                    str(tmp_path / "y"), "--no_progress"]) == 1
    assert "legacy per-rank format is not built" in capsys.readouterr().err


@pytest.mark.slow
def test_precision_at_ep_tp_pp_and_after_reshard(converted):
    tmp, out = converted
    args = []
    for kind, (hf, mc) in out.items():
        args += ["--hf", str(hf), "--mcore", str(mc)]
    hf, mc = out["qwen3_moe"]
    assert reshard([str(mc), "--tp", "2", "--pp", "2", "--ep", "2", "--out", str(tmp / "rs"), "--no_progress"]) == 0
    args += ["--hf", str(hf), "--mcore", str(tmp / "rs")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "hpctrain.checkpoint.precision", *args, "--layout", "1x1x2", "--layout", "2x1", "--layout", "1x2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("precision")]
    for tag in ("TP=1 PP=1 EP=2,", "TP=2 PP=1,", "TP=1 PP=2,"):
        assert sum(tag in l for l in lines) >= 3, (tag, lines)
    for line in lines:
        assert "precision OK" in line and "argmax agreement 100.00%" in line, line
