"""HF outputs of a LoRA run's checkpoint: PEFT's adapter format, or the merged full model.

A LoRA checkpoint holds the frozen base weights, the adapters (``<linear>.lora_A`` / ``lora_B``,
stacked over the layers like every other tensor) and, in its common state, the settings they were
trained with (``hpctrain.lora``: rank, alpha, rslora, bias, modules_to_save). ``write_adapter`` writes
``adapter_model.safetensors`` + ``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` loads
on the HF base model; ``merge_lora`` folds ``W + scaling * B @ A`` (fp32) into the base weights and
writes a plain HF model (the full-model converter with one hook).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader
from hpctrain.checkpoint.convert_hf_to_mcore import geometry
from hpctrain.model.lora import peft_map
from hpctrain.model.lora.settings import SAVE_MODULES, LoraSettings

SUFFIXES = (".lora_A", ".lora_B")


def lora_meta(ref: layout.CheckpointRef) -> dict | None:
    """The checkpoint's LoRA settings, None for a full-training checkpoint."""
    from hpctrain.checkpoint.reshard import _common

    if not (ref.path / ".metadata").is_file():  # a legacy torch checkpoint: LoRA runs save torch_dist
        return None
    meta = _common(ref).get("hpctrain", {})
    return meta.get("lora") if isinstance(meta, dict) and meta.get("content", {}).get("lora") else None


def _stacked_lora_keys(reader: DcpReader) -> list[str]:
    return sorted(k for k in reader.tensor_keys() if k.endswith(SUFFIXES))


def _layer(reader: DcpReader, key: str, i: int) -> torch.Tensor:
    shape = reader.shape(key)
    return reader.read(key, (i,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]


def _per_layer(key: str, i: int) -> str:
    return key.replace("decoder.layers.", f"decoder.layers.{i}.", 1)


def adapter_tensors(reader: DcpReader, meta: dict, num_layers: int) -> tuple[dict, set[str]]:
    """(whole megatron tensors PEFT's file holds, the adapted linears' global names)."""
    out, adapted = {}, set()
    stacked = _stacked_lora_keys(reader)
    for key in stacked:
        for i in range(num_layers):
            name = _per_layer(key, i)
            out[name] = _layer(reader, key, i)
            adapted.add(name.rsplit(".", 1)[0])
    if meta.get("bias") == "all":
        for key in reader.tensor_keys():
            if key.endswith(".bias") and key.startswith("decoder.layers."):
                for i in range(num_layers):
                    out[_per_layer(key, i)] = _layer(reader, key, i)
    for m in meta.get("modules_to_save", []):
        key = SAVE_MODULES[m][1]
        out[key] = reader.read(key)
    return out, adapted


def settings_of(meta: dict, adapted: set[str]) -> LoraSettings:
    return LoraSettings(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"],
                        targets=frozenset(n.rsplit(".", 1)[-1] for n in adapted),
                        modules_to_save=tuple(meta.get("modules_to_save", [])),
                        use_rslora=meta.get("use_rslora", False), bias=meta.get("bias", "none"))


def write_adapter(ref: layout.CheckpointRef, args: dict, out: Path, base_model: str | None) -> None:
    """PEFT adapter files of checkpoint ``ref`` into the (existing, empty) folder ``out``."""
    meta = lora_meta(ref)
    if meta is None:
        raise ValueError(f"{ref.path} holds no LoRA adapters (a full-training checkpoint)")
    reader = DcpReader(ref.path)
    tensors, adapted = adapter_tensors(reader, meta, args["num_layers"])
    state = peft_map.to_peft(tensors, args["model_type"], geometry(args), adapted)
    peft_map.write_adapter(out, state, peft_map.adapter_config(settings_of(meta, adapted), adapted, base_model))


def merge_hook(ref: layout.CheckpointRef, args: dict):
    """For the full-model converter: (stacked key, layer, tensor) -> the merged tensor."""
    meta = lora_meta(ref)
    if meta is None:
        raise ValueError(f"{ref.path} holds no LoRA adapters: --merge_lora true is for LoRA checkpoints; "
                         "drop it")
    reader = DcpReader(ref.path)
    lora = set(_stacked_lora_keys(reader))
    r = meta["rank"]
    scaling = meta["alpha"] / (r ** 0.5 if meta.get("use_rslora") else r)

    def merge(key: str, i: int, t: torch.Tensor) -> torch.Tensor:
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base is None or f"{base}.lora_A" not in lora:
            return t
        a = _layer(reader, f"{base}.lora_A", i).float()
        b = _layer(reader, f"{base}.lora_B", i).float()
        return (t.float() + scaling * (b @ a)).to(t.dtype)

    return merge
