"""HF (safetensors or GGUF) -> megatron-core torch_dist, streaming one tensor chunk at a time.

Output (a checkpoint root, see layout.py)::

    D/latest_checkpointed_iteration.txt   "release" (written last)
    D/release/                            torch_dist: .metadata, __0_<k>.distcp, metadata.json, common.pt
    D/config.json, tokenizer files, generation_config.json, args.json

Layer tensors are written one chunk per layer (megatron-core's own layout); each chunk is read from
the memory-mapped safetensors file, re-laid-out (QKV / gated MLP / vocab padding) and written
before the next is read, so peak memory is about one layer's largest tensor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from hpctrain.checkpoint import convert_dcp as cd
from hpctrain.checkpoint import hf_io, layout
from hpctrain.checkpoint.output import staged_output
from hpctrain.files import check_json_files
from hpctrain.model.build import model_args_from_hf
from hpctrain.model.families import family_by_name, read_config_json, with_dtype
from hpctrain.model.families.base import (Geometry, expert_name, is_expert_rule, is_layer_rule, layer_key,
                                          layer_name, moe_pattern)
from hpctrain.model.mcore_config import DTYPES
from hpctrain.progress import Progress

log = logging.getLogger(__name__)

EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")
EXPERT_EXTRA_STATE = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
IGNORED_HF = ("rotary_emb.inv_freq",)


def geometry(args: dict[str, Any]) -> Geometry:
    return Geometry(num_layers=args["num_layers"], hidden_size=args["hidden_size"],
                    num_heads=args["num_attention_heads"], num_query_groups=args["num_query_groups"],
                    head_dim=args["kv_channels"], ffn_hidden_size=args["ffn_hidden_size"],
                    vocab_size=args["vocab_size"], padded_vocab_size=args["padded_vocab_size"],
                    tied=not args["untie_embeddings_and_output_weights"], moe_layers=moe_pattern(args),
                    num_experts=int(args.get("num_experts") or 0))


def rule_hf_names(r, g: Geometry) -> set[str]:
    """Every HF tensor name rule ``r`` reads or writes in this model."""
    out = set()
    for n in r.hf_names():
        names = {layer_name(n, i) for i in g.layers_of(r.layers)} if "*" in n else {n}
        if is_expert_rule(r):
            names = {expert_name(x, e) for x in names for e in range(g.num_experts)}
        out |= names
    return out


def _check_names(src, rules, g: Geometry) -> None:
    need = set()
    for r in rules:
        need |= rule_hf_names(r, g)
    missing = sorted(need - set(src.names()))
    if missing:
        raise KeyError(f"{src.dir}: {len(missing)} tensors the config needs are missing, e.g. "
                       f"{missing[:3]}; the checkpoint does not match its config.json")
    extra = [n for n in set(src.names()) - need
             if not n.endswith(IGNORED_HF) and not (g.tied and n == "lm_head.weight")]
    if extra:
        raise KeyError(f"{src.dir}: {len(extra)} tensors have no megatron-core counterpart, e.g. "
                       f"{sorted(extra)[:3]}; this architecture variant is not supported")


def plan_items(src, args: dict[str, Any], dtype: torch.dtype | None) -> list:
    """The lazy chunks (and per-layer extra-state objects) of the whole model."""
    fam = family_by_name(args["model_type"])
    g = geometry(args)
    rules = fam.active_rules(g.tied)
    _check_names(src, rules, g)
    items: list = []
    for r in rules:
        items += _rule_items(src, r, g, dtype)
    items += extra_state_items(g)
    return items


def _rule_items(src, r, g: Geometry, dtype: torch.dtype | None) -> list:
    """The lazy chunks of one rule: one per layer (and per expert), or the whole tensor."""
    layers = g.layers_of(r.layers) if is_layer_rule(r) else [None]
    if not layers:  # e.g. the dense-MLP rules of a model whose layers are all MoE
        return []
    first = layers[0] if layers[0] is not None else 0
    names0 = {n: expert_name(layer_name(n, first), 0) for n in r.hf_names()}
    shape = r.mcore_shape({n: src.shape(n0) for n, n0 in names0.items()}, g)
    dt = dtype or src.dtype(next(iter(names0.values())))
    experts = list(range(g.num_experts)) if is_expert_rule(r) else [None]
    lead = (g.num_experts,) if is_expert_rule(r) else ()

    def make(i, e, r=r):
        get = (lambda n: src.get(layer_name(n, i))) if i is not None else src.get
        return (r.to_mcore(get, g, e) if e is not None else r.to_mcore(get, g)).to(dt)

    items = []
    for i in layers:
        for e in experts:
            axes = () if i is None or g.per_layer_keys else (i,)
            full = ((g.num_layers,) if axes else ()) + lead + shape
            off = axes + ((e,) if e is not None else ()) + (0,) * len(shape)
            sizes = (1,) * (len(axes) + len(lead)) + shape
            key = layer_key(r, i, g) if i is not None else r.mcore
            items.append(cd.LazyChunk(key, full, off, sizes, dt,
                                      lambda i=i, e=e: make(i, e).reshape(sizes)))
    return items


def extra_state_items(g: Geometry) -> list:
    """The empty ``_extra_state`` objects megatron-core's linears (and experts) save, per layer."""
    items = []
    for i in range(g.num_layers):
        moe = bool(g.moe_layers and g.moe_layers[i])
        mods = EXTRA_STATE_MODULES[:2] + (EXPERT_EXTRA_STATE if moe else EXTRA_STATE_MODULES[2:])
        for m in mods:
            key = f"decoder.layers.{i}.{m}._extra_state" if g.per_layer_keys else f"decoder.layers.{m}._extra_state"
            layer_off, layer_n = ((), ()) if g.per_layer_keys else ((i,), (g.num_layers,))
            experts = range(g.num_experts) if m in EXPERT_EXTRA_STATE else [None]
            for e in experts:
                off = layer_off + ((e,) if e is not None else ())
                n = layer_n + ((g.num_experts,) if e is not None else ())
                items.append(cd.LazyBytes(cd.sharded_object_key(key, off or (0,), n or (1,)), cd.none_bytes))
    return items


def open_source(model: str, dtype: torch.dtype | None):
    """(hf_config, tensor source, tokenizer-or-None) for an HF dir or a GGUF file/dir."""
    gguf = hf_io.find_gguf(model)
    if gguf is not None:
        cfg, src, tok = hf_io.load_gguf(gguf, dtype)
        return cfg, src, tok
    cfg_path = Path(model) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model}: no config.json (and no .gguf file); pass an HF model "
                                "directory or a GGUF file to --model")
    return read_config_json(cfg_path), hf_io.HfSafetensors(model), None


def source_files(model: str) -> list[Path]:
    """The files conversion reads from ``model`` (an output folder must not be or hold them)."""
    p = Path(model)
    return [p] if p.is_file() else [f for f in p.iterdir() if f.is_file()] if p.is_dir() else []


def hf_to_mcore(model: str, output_dir: str, torch_dtype: str | None = None,
                overwrite: bool = False, progress: bool = True, tp: int = 1) -> layout.CheckpointRef:
    """Convert; returns the written checkpoint. The embedding has the vocabulary's rows, padded only
    where ``tp`` does not divide it (``mcore_config.padded_vocab``). The output is built aside and
    renamed into place when complete (checkpoint/output.py); inside it the tracker file is written last."""
    dtype = DTYPES[torch_dtype] if torch_dtype else None
    check_json_files(model)
    cfg, src, tok = open_source(model, dtype)
    where = str(hf_io.find_gguf(model) or Path(model) / "config.json")
    args = model_args_from_hf(cfg, tp=tp, where=where)
    with staged_output(output_dir, overwrite, source_files(model)) as out:
        items = plan_items(src, args, dtype)
        bar = Progress(len(items), "to_mcore", "tensors", enabled=progress)
        cd.write_dcp(out / layout.RELEASE, items, common={}, on_item=lambda it: bar.update(1))
        bar.close()
        out_cfg = with_dtype(cfg, dtype or items[0].dtype)
        (out / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True))
        if tok is not None:
            tok.save_pretrained(str(out))
        else:
            hf_io.copy_tokenizer_files(model, out)
        (out / "args.json").write_text(json.dumps({"model": args, "source": str(model)}, indent=2,
                                                  sort_keys=True, default=str))
        layout.write_tracker(out, layout.RELEASE)
    return layout.require_latest(output_dir)
