"""Fixtures of the fault tests (helpers: faultkit.py)."""
from __future__ import annotations

import shutil

import pytest

from faultkit import TOKENIZER, hpctrain


@pytest.fixture(scope="session")
def tiny_mcore(tmp_path_factory):
    """(HF dir, mcore checkpoint root): a 1-layer Qwen2 with the real Qwen2.5 vocabulary and
    tokenizer, converted by `hpctrain export --to_mcore`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("faults_model")
    hf, mc = tmp / "hf", tmp / "mcore"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(hf)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, hf / f.name)
    p = hpctrain("export", "--model", hf, "--to_mcore", "true", "--output_dir", mc, "--no_progress")
    assert p.returncode == 0, p.stderr[-3000:]
    return hf, mc
