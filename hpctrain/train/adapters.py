"""`--adapters DIR` for sft/pt: start the LoRA adapters from a PEFT adapter folder.

Every rank reads the folder (small: the adapters only), turns PEFT's tensors into whole megatron
tensors (model/lora/peft_map.py: the family's fused-row rules) and copies its own TP shard into its
adapted linears: B's rows for column-parallel linears (linear_fc1: this rank's [gate_r; up_r]),
A's columns for row-parallel ones.
"""
from __future__ import annotations

import logging

import torch

from hpctrain.config.errors import ConfigError
from hpctrain.model.families.base import Geometry

log = logging.getLogger("hpctrain.train")


def _geometry(m) -> Geometry:
    heads = m.num_attention_heads
    groups = m.num_query_groups if m.num_query_groups and m.group_query_attention is not False else heads
    return Geometry(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=heads, num_query_groups=groups,
                    head_dim=m.kv_channels or m.hidden_size // heads, ffn_hidden_size=m.ffn_hidden_size,
                    vocab_size=m.padded_vocab_size, padded_vocab_size=m.padded_vocab_size,
                    tied=not m.untie_embeddings_and_output_weights)


def _check_config(path: str, acfg: dict, s) -> None:
    mine = dict(r=s.rank, lora_alpha=s.alpha, use_rslora=s.use_rslora)
    theirs = dict(r=acfg.get("r"), lora_alpha=float(acfg.get("lora_alpha", 0)),
                  use_rslora=bool(acfg.get("use_rslora", False)))
    diff = [f"{k} {theirs[k]!r} (this run: {mine[k]!r})" for k in mine if theirs[k] != mine[k]]
    if diff:
        raise ConfigError(f"--adapters {path}: adapter_config.json has {', '.join(diff)}; set --lora_rank / "
                          "--lora_alpha / --use_rslora to the adapter's values")
    if acfg.get("bias", "none") != "none" or acfg.get("modules_to_save"):
        raise ConfigError(f"--adapters {path}: adapters with bias or modules_to_save are not loaded (they change "
                          "base weights); continue such a run from its checkpoint with --load")


def local_shard(module, which: str, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's part of a whole megatron adapter tensor (see the module doc)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    tp, r = module.tp_group.size(), module.tp_group.rank()
    if tp == 1:
        return full
    column = isinstance(module, ColumnParallelLinear)
    if column and which == "lora_B":
        if module._lora_gated:
            gate, up = torch.chunk(full, 2, dim=0)
            return torch.cat([torch.chunk(gate, tp, 0)[r], torch.chunk(up, tp, 0)[r]])
        return torch.chunk(full, tp, 0)[r]
    if not column and which == "lora_A":
        return torch.chunk(full, tp, 1)[r]
    return full


def load_adapters(cfg, chunks: list, path: str) -> None:
    """Copy the PEFT adapter at ``path`` into the LoRA modules of ``chunks``."""
    from hpctrain.model.lora import lora_settings, peft_map
    from hpctrain.model.lora.apply import lora_modules
    from megatron.core.utils import unwrap_model

    settings = lora_settings(cfg.tuner, tied=not cfg.model.untie_embeddings_and_output_weights)
    state, acfg = peft_map.read_adapter(path)
    _check_config(path, acfg, settings)
    if not cfg.model.model_type:
        raise ConfigError(f"--adapters {path}: the model family is unknown (no config.json for --model / --load); "
                          "pass --model HF_DIR")
    g, n = _geometry(cfg.model), 0
    for chunk in chunks:
        for name, module in lora_modules(unwrap_model(chunk)):
            keys = [f"{name}.lora_A", f"{name}.lora_B"]
            full = peft_map.from_peft(state, cfg.model.model_type, g, keys, f"--adapters {path}")
            with torch.no_grad():
                for key in keys:
                    which = key.rsplit(".", 1)[1]
                    p = getattr(module, which)
                    p.copy_(local_shard(module, which, full[key]).to(p.dtype))
            n += 1
    log.info("LoRA: adapters of %d linears on this rank loaded from %s", n, path)
