"""Which model `hpctrain infer --model` names, and loading it with transformers.

Accepted: an HF model directory (config.json + safetensors/bin weights), a .gguf file, or a
directory holding exactly one .gguf file. A megatron-core checkpoint (what sft/pt/export --to_mcore
write) cannot be loaded by transformers: it is refused with the exact export command that makes
an HF copy of it.
"""
from __future__ import annotations

import shlex
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _is_mcore(path: Path) -> bool:
    from hpctrain.checkpoint import layout

    has_weights = any(any(path.glob(p)) for p in WEIGHT_PATTERNS)
    return not has_weights and (layout.holds_checkpoint(path) or (path / ".metadata").is_file())


def export_command(mcore: str) -> str:
    """The command that converts the mcore checkpoint ``mcore`` into an HF folder next to it."""
    out = str(Path(mcore.rstrip("/")).with_name(Path(mcore.rstrip("/")).name + "-hf"))
    return (f"hpctrain export --mcore_model {shlex.quote(mcore)} --to_hf true "
            f"--output_dir {shlex.quote(out)}")


def locate_model(model: str) -> tuple[Path, dict]:
    """(directory, from_pretrained kwargs) for an HF dir or a GGUF file; FileNotFoundError saying why not."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file or directory (give an HF model directory "
                                "with config.json, e.g. the --output_dir of `hpctrain export --to_hf`, "
                                "or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"--model {model}: a file that is not .gguf; give the model's directory instead")
        return path.parent, {"gguf_file": path.name}
    if _is_mcore(path):
        raise FileNotFoundError(f"--model {model} is a megatron-core checkpoint, which transformers cannot load; "
                                f"convert it to HF first: {export_command(model)}")
    if (path / "config.json").exists():
        return path, {}
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"--model {model}: no config.json in this directory and not exactly one "
                                f".gguf file ({len(ggufs)} found)")
    return path, {"gguf_file": ggufs[0].name}


def load_model_and_tokenizer(model: str, dtype: str = "float32", device: str | None = None):
    """Load an HF model dir, or a GGUF file (transformers dequantises it), with its tokenizer."""
    path, kwargs = locate_model(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not kwargs:  # an HF directory (a GGUF file carries its own tokenizer)
        from hpctrain.data.tokenizer import check_tokenizer_dir

        check_tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    mdl = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return mdl.to(device).eval(), tok
