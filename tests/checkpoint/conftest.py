"""Tiny random HF models (saved with save_pretrained) for conversion tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2.5-tokenizer"

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def make_tiny(kind: str, out: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """kind: qwen2 (untied, QKV bias), qwen2_tied, llama3 (rope scaling, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind.startswith("qwen2"):
        cfg = Qwen2Config(**TINY, tie_word_embeddings=kind == "qwen2_tied", rope_theta=1e6,
                          rms_norm_eps=1e-6)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "llama3":
        cfg = LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: randomise so mistakes show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    model = model.to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in TOKENIZER.iterdir():
        if not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Lazily built tiny models: tiny_models('qwen2') -> dir."""
    root = tmp_path_factory.mktemp("tiny_hf")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_tiny(kind, root / kind)
        return cache[kind]

    return get
