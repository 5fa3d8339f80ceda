"""Load the tokenizer of a model given as an HF directory or a GGUF file."""
from __future__ import annotations

import os
from pathlib import Path

from hpctrain.errors import UserError, one_line
from hpctrain.files import check_json_files

# One of these defines the vocabulary (a fast tokenizer, a sentencepiece model, a BPE/WordPiece vocab).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(model: str):
    """AutoTokenizer for an HF model directory, or for a ``.gguf`` file (read by transformers+gguf)."""
    from transformers import AutoTokenizer

    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer source {model!r} does not exist; pass an HF model directory "
                                "or a .gguf file (model.model)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"{model}: a model file must be .gguf; otherwise pass the HF model directory")
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    check_tokenizer_dir(p)
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - whatever transformers rejects lies in this folder's files
        raise UserError(f"{p}: transformers cannot load the tokenizer and config: {one_line(e)}") from e


def check_tokenizer_dir(p: Path) -> None:
    """Refuse a directory without tokenizer files (transformers would build an empty tokenizer that
    fails later with 'no chat template' or 'cannot reshape tensor of 0 elements') or with a damaged
    JSON file (config or tokenizer: named, instead of a bare JSONDecodeError)."""
    check_json_files(p)
    if not any((p / n).is_file() for n in VOCAB_FILES):
        raise UserError(f"{p} has no tokenizer ({', '.join(VOCAB_FILES)}: none found); copy the base "
                        "model's tokenizer files into it, or point --model at the HF model directory")


def tokenizer_files(model: str) -> list[Path]:
    """The files that define the tokenizer and its chat template (for the prep fingerprint)."""
    p = Path(model)
    if p.is_file():
        return [p]
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
    return [p / n for n in names if os.path.exists(p / n)]
