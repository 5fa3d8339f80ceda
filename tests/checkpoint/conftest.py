"""Tiny random HF models (saved with save_pretrained) for conversion tests (tests/fixtures/tiny_hf.py)."""
from __future__ import annotations

import pytest
from tiny_hf import make_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Lazily built tiny models: tiny_models('qwen2') -> dir."""
    root = tmp_path_factory.mktemp("tiny_hf")
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = make_tiny(kind, root / kind)
        return cache[kind]

    return get
