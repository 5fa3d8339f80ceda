"""Where the description of a model lives: the HF config.json (or GGUF) behind --model / --load.

``--model`` is an HF directory (config.json + tokenizer), a config.json file, or a GGUF file (or a
directory holding one). ``--load`` is a checkpoint root, an ``iter_*`` / ``release`` dir, or a save
root holding ``v<N>-<timestamp>`` run folders: the newest complete run is the one meant (as for
loading the weights, ``layout.find_latest``), and its root holds config.json and the tokenizer
(conversion and training copy them there).

Reading what is found is ``read_model_config``; turning it into model arguments is the families'
``model_args`` (the one mapping).
"""
from __future__ import annotations

from pathlib import Path

from hpctrain.checkpoint import hf_io, layout
from hpctrain.model.families import HfConfigError, read_config_json


def load_root(load: str | None) -> Path | None:
    """The checkpoint root (tracker + config.json) of the newest complete checkpoint under ``load``."""
    if not load:
        return None
    ref = layout.find_latest(load)
    return ref.root if ref is not None else None


def model_config_path(model: str | None, load: str | None) -> Path | None:
    """config.json (or .gguf) describing the model: --model's, else the --load checkpoint root's."""
    if model:
        p = Path(model)
        if p.is_file() and p.suffix in (".json", ".gguf"):
            return p
        if p.is_dir() and (p / "config.json").is_file():
            return p / "config.json"
        gguf = hf_io.find_gguf(p) if p.exists() else None
        if gguf is not None:
            return gguf
    root = load_root(load)
    if root is None and load and Path(load).is_dir():
        root = Path(load)  # an incomplete checkpoint still has its config.json for the error messages
    if root is not None and (root / "config.json").is_file():
        return root / "config.json"
    return None


def read_model_config(path: Path) -> dict:
    """The HF config dict in a config.json, or of a GGUF file (as transformers reads it)."""
    if path.suffix != ".gguf":
        return read_config_json(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except (OSError, ValueError) as e:
        raise HfConfigError(f"{path}: transformers cannot read the GGUF file's config ({e})") from None


def model_args_from_checkpoint(root: str | Path) -> dict:
    """Model arguments of a converted/trained checkpoint root (its config.json + on-disk vocab)."""
    from hpctrain.checkpoint.convert_dcp import DcpReader
    from hpctrain.model.build import model_args_from_hf

    root = Path(root)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: a converted checkpoint keeps the HF "
                                "config.json in its root (re-run `hpctrain export --to_mcore`)")
    ref = layout.require_latest(root)
    emb = DcpReader(ref.path).shape("embedding.word_embeddings.weight")
    return model_args_from_hf(read_config_json(cfg_path), padded_vocab_size=int(emb[0]),
                              where=str(cfg_path))
