"""megatron-core torch_dist -> HF safetensors (sharded + index), config.json, tokenizer.

Works for any checkpoint this project writes (``release`` or ``iter_*``, any TP/PP it was
trained with: the torch_dist files hold global tensors). Reads one layer's chunk of one tensor at
a time; the HF shards are flushed every ``max_shard_bytes``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from hpctrain.checkpoint import hf_io, layout
from hpctrain.checkpoint.convert_dcp import DcpReader
from hpctrain.checkpoint.convert_hf_to_mcore import geometry
from hpctrain.checkpoint.locate import model_args_from_checkpoint
from hpctrain.checkpoint.output import staged_output
from hpctrain.files import check_json_files
from hpctrain.model.families import family_by_name, read_config_json, with_dtype
from hpctrain.model.families.base import is_expert_rule, is_layer_rule, layer_key, layer_name
from hpctrain.model.mcore_config import DTYPES
from hpctrain.progress import Progress


def iter_hf_from_mcore(reader: DcpReader, args: dict, dtype: torch.dtype | None = None,
                       bar=None, merge=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in HF order: embeddings, layer by layer, final norm, lm_head.
    ``merge(key, layer, tensor)``: applied to each layer tensor first (LoRA merge, lora_export.py)."""
    fam = family_by_name(args["model_type"])
    g = geometry(args)
    rules = fam.active_rules(g.tied)
    glob = [r for r in rules if not is_layer_rule(r)]
    per_layer = [r for r in rules if is_layer_rule(r)]

    def emit(tensors: dict[str, torch.Tensor]):
        for n, t in tensors.items():
            yield n, (t.to(dtype) if dtype is not None else t)

    def check(key: str, want: tuple) -> None:
        have = reader.shape(key)
        if have != want:
            raise ValueError(f"{reader.path}: {key} has shape {have}, config.json implies {want}; "
                             "the checkpoint does not belong to this config")

    for r in glob:
        if r.mcore.startswith("embedding."):
            yield from emit(r.to_hf(reader.read(r.mcore), g))
    for i in range(g.num_layers):
        for r in per_layer:
            if i in g.layers_of(r.layers):
                yield from emit({layer_name(k, i): v for k, v in _layer_to_hf(reader, r, i, g, check, merge).items()})
        if bar is not None:
            bar.update(1)
    for r in glob:
        if not r.mcore.startswith("embedding."):
            yield from emit(r.to_hf(reader.read(r.mcore), g))


def _layer_to_hf(reader: DcpReader, r, i: int, g, check, merge=None) -> dict[str, torch.Tensor]:
    """HF tensors (names with ``*`` still in them) of rule ``r`` at layer ``i``, one chunk read at a time;
    ``merge`` (LoRA, dense layers only: adapters are not put on experts) first folds the adapter in."""
    key = layer_key(r, i, g)
    shape = reader.shape(key)
    lead = () if g.per_layer_keys else (g.num_layers,)
    if lead and shape[0] != g.num_layers:
        check(key, lead + shape[1:])
    if is_expert_rule(r) and shape[len(lead)] != g.num_experts:
        check(key, lead + (g.num_experts,) + shape[len(lead) + 1:])
    inner = shape[len(lead) + (1 if is_expert_rule(r) else 0):]
    out: dict[str, torch.Tensor] = {}
    for e in range(g.num_experts) if is_expert_rule(r) else [None]:
        pre = ((i,) if lead else ()) + ((e,) if e is not None else ())
        t = reader.read(key, pre + (0,) * len(inner), (1,) * len(pre) + inner).reshape(inner)
        if merge is not None and e is None:
            t = merge(r.mcore.replace(".*.", "."), i, t)
        out.update(r.to_hf(t, g, e) if e is not None else r.to_hf(t, g))
    return out


def mcore_to_hf(mcore_model: str, output_dir: str, torch_dtype: str | None = None,
                overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                progress: bool = True, merge_lora: bool = False, ref: layout.CheckpointRef | None = None) -> Path:
    """Convert the latest complete checkpoint under ``mcore_model`` (or ``ref``) to an HF model dir;
    a LoRA checkpoint to a PEFT adapter dir, or with ``merge_lora`` to the merged model. The output
    is built aside and renamed into place when complete (checkpoint/output.py): a run killed
    half-way never leaves a folder that looks like a model (e.g. config.json without tokenizer)."""
    from hpctrain.checkpoint import lora_export

    ref = ref or layout.require_latest(mcore_model)
    check_json_files(ref.root)
    args = model_args_from_checkpoint(ref.root)
    reader = DcpReader(ref.path)
    dtype = DTYPES[torch_dtype] if torch_dtype else None
    inputs = [ref.path] + [f for f in ref.root.iterdir() if f.is_file()]
    adapter = lora_export.lora_meta(ref) is not None and not merge_lora
    merge = lora_export.merge_hook(ref, args) if merge_lora else None
    with staged_output(output_dir, overwrite, inputs) as out:
        if adapter:
            lora_export.write_adapter(ref, args, out, _base_model(ref.root))
            hf_io.copy_tokenizer_files(ref.root, out)
            return Path(output_dir)
        bar = Progress(args["num_layers"], "to_hf", "layers", enabled=progress)
        hf_io.write_safetensors_shards(out, iter_hf_from_mcore(reader, args, dtype, bar, merge), max_shard_bytes)
        bar.close()
        cfg = with_dtype(read_config_json(ref.root / "config.json"),
                         dtype or reader.dtype("embedding.word_embeddings.weight"))
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        hf_io.copy_tokenizer_files(ref.root, out)
        if not (out / "generation_config.json").is_file():
            _write_generation_config(cfg, out)
    return Path(output_dir)


def _base_model(root: Path) -> str | None:
    """The HF model a run started from (args.json's model.model), for adapter_config.json."""
    try:
        return (json.loads((root / "args.json").read_text()).get("model") or {}).get("model")
    except (OSError, ValueError):
        return None


def _write_generation_config(cfg: dict, out: Path) -> None:
    from transformers import GenerationConfig

    gc = GenerationConfig(bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                          pad_token_id=cfg.get("pad_token_id"))
    gc.save_pretrained(str(out))
