"""Fixtures shared by the top-level tests (infer, batch inference)."""
from __future__ import annotations

from pathlib import Path

import pytest

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "qwen2.5-tokenizer"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama sized to the Qwen2.5 vocabulary, saved with the real Qwen2.5 tokenizer
    (and its chat template): its answers are gibberish but exactly comparable."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)  # writes tokenizer.json, so the loads are fast
    return out
