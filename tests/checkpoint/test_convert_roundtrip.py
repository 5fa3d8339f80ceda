"""HF -> mcore -> HF bit-exact, and HF vs mcore logits (fp32, CPU) through `hpctrain export`.

The precision half runs `hpctrain export ... --test_convert_precision true` in a subprocess: it
sets up a gloo group and hpctrain's megatron-core CPU patches, which must not leak into pytest.
"""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader
from hpctrain.checkpoint.export import run as export

ROOT = Path(__file__).resolve().parents[2]


def load_dir(d: Path) -> dict:
    out = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        out.update(load_file(f))
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hpctrain.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


KINDS = ["qwen2", "qwen2_tied", "llama3", "qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_mixed"]


def to_mcore(hf: Path, mc: Path) -> None:
    assert export(["--model", str(hf), "--to_mcore", "true", "--output_dir", str(mc),
                   "--no_progress"]) == 0


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for kind in KINDS:
        to_mcore(tiny_models(kind), root / kind)
        out[kind] = (tiny_models(kind), root / kind)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_bit_exact(converted, tmp_path, kind):
    hf, mc = converted[kind]
    hf2 = tmp_path / "hf2"
    # layout: release + tracker, torch_dist files, HF config + tokenizer in the root
    ref = layout.require_latest(mc)
    assert ref.release and (ref.path / "metadata.json").is_file() and (ref.path / "common.pt").is_file()
    assert (mc / "config.json").is_file() and (mc / "vocab.json").is_file()
    emb = DcpReader(ref.path).shape("embedding.word_embeddings.weight")
    assert emb == (300, 64)  # exactly vocab_size rows: TP=1 needs no padding (mcore_config.padded_vocab)
    assert export(["--mcore_model", str(mc), "--to_hf", "true", "--output_dir", str(hf2),
                   "--no_progress"]) == 0
    assert_same(load_dir(hf), load_dir(hf2))
    index = json.loads((hf2 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_dir(hf2))
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(hf2))
    assert m.config.tie_word_embeddings == kind.endswith("_tied")


def report_lines(stdout: str) -> list[str]:
    return [l for l in stdout.splitlines() if l.startswith("precision")]


def check_lines(lines: list[str]) -> None:
    for line in lines:
        max_diff = float(line.split("max abs diff ")[1].split()[0])
        assert "precision OK" in line and max_diff < 1e-3, line
        assert "argmax agreement 100.00%" in line, line


def test_cli_precision(tiny_models, tmp_path):
    """`hpctrain export --to_mcore true --test_convert_precision true` (one process, TP=PP=1)."""
    r = cli("export", "--model", str(tiny_models("qwen2")), "--to_mcore", "true", "--output_dir",
            str(tmp_path / "mc"), "--test_convert_precision", "true", "--no_progress")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = report_lines(r.stdout)
    assert len(lines) == 1
    check_lines(lines)


@pytest.mark.slow
def test_precision_tp2_pp2_torchrun(converted, tmp_path):
    """Each mcore checkpoint (and a `hpctrain reshard` copy) loaded at TP=1, TP=2 and PP=2
    (2 gloo processes) vs HF fp32 logits."""
    from hpctrain.checkpoint.reshard import run as reshard

    args = []
    for kind in (k for k in KINDS if "moe" not in k):  # MoE at EP/TP/PP: tests/moe/test_moe_convert.py
        hf, mc = converted[kind]
        args += ["--hf", str(hf), "--mcore", str(mc)]
    hf, mc = converted["llama3"]
    assert reshard([str(mc), "--tp", "2", "--pp", "2", "--out", str(tmp_path / "rs"), "--no_progress"]) == 0
    args += ["--hf", str(hf), "--mcore", str(tmp_path / "rs")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "hpctrain.checkpoint.precision", *args,
           "--layout", "1x1", "--layout", "2x1", "--layout", "1x2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = report_lines(r.stdout)
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        assert sum(f"TP={tp} PP={pp}," in l for l in lines) >= 4, lines
    check_lines(lines)


def test_bf16_roundtrip_and_small_shards(tiny_models, tmp_path):
    """--torch_dtype bfloat16 writes bf16 chunks; to_hf with tiny shards writes an index."""
    hf = tiny_models("qwen2")
    assert export(["--model", str(hf), "--to_mcore", "true", "--output_dir", str(tmp_path / "mc"),
                   "--torch_dtype", "bfloat16", "--no_progress"]) == 0
    r = DcpReader(layout.require_latest(tmp_path / "mc").path)
    assert r.dtype("decoder.layers.self_attention.linear_qkv.weight") == torch.bfloat16
    assert export(["--mcore_model", str(tmp_path / "mc"), "--to_hf", "true", "--output_dir",
                   str(tmp_path / "hf2"), "--max_shard_size_gb", "0.00005", "--no_progress"]) == 0
    assert len(glob.glob(str(tmp_path / "hf2" / "model-*-of-*.safetensors"))) > 1
    want = {k: v.to(torch.bfloat16) for k, v in load_dir(hf).items()}
    assert_same(want, load_dir(tmp_path / "hf2"))
