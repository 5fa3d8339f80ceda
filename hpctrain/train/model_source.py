"""What the trainer builds and starts from: the architecture, the dtype, the first weights.

The architecture comes from the HF config.json beside ``--model`` (else in the ``--load``
checkpoint's run root) through the families' ``model_args`` — the one mapping, shared with
conversion, export, the precision test and the planner. A cfg.model field the user set wins over
config.json (and is logged when it differs); a contradiction that would break loading is caught
when the checkpoint is loaded (hpctrain.checkpoint.match).

The dtype follows the checkpoint, as Megatron-SWIFT does: bf16/fp16 weights train in bf16/fp16
unless --torch_dtype / --bf16 / --fp16 say otherwise; the choice is logged.

The first weights (``weights_origin``): --load's checkpoint; else --model's HF weights (converted
on the fly, hpctrain.train.hf_init); random only with ``--load_safetensors false`` or when no
model is named at all (shape given by [model] fields: pretraining from scratch).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hpctrain.config.errors import ConfigError
from hpctrain.config.resolve import apply_torch_dtype
from hpctrain.config.sections import MODEL_FALLBACKS

log = logging.getLogger("hpctrain.train")

SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
NOT_FILLED = ("vocab_size", "torch_dtype")  # not cfg.model fields / decided by choose_precision
PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class ModelSource:
    """Where the run's model came from (for the start-up checks and the log)."""

    config_path: Path | None  # the config.json (or GGUF) the architecture was read from
    vocab_size: int | None    # config.json's real vocabulary (the embedding has padded_vocab_size rows)
    weights: str              # "checkpoint" (--load), "hf" (--model's weights) or "random"
    precision: str            # e.g. "bf16 (from /m/config.json dtype=bfloat16)"


def find_hf_config(cfg) -> Path | None:
    from hpctrain.checkpoint.locate import model_config_path

    return model_config_path(cfg.model.model, cfg.model.load)


def weights_origin(cfg) -> str:
    """"checkpoint", "hf" or "random"; refuses --load together with --load_safetensors true."""
    m = cfg.model
    if m.load and m.load_safetensors:
        raise ConfigError("model.load and model.load_safetensors = true both name the starting weights; "
                          "drop --load_safetensors (weights from --load) or --load (weights from --model)")
    if m.load:
        return "checkpoint"
    return "hf" if m.model and m.load_safetensors is not False else "random"


def fill_model_fields(cfg) -> ModelSource:
    """Fill the cfg.model fields the user left unset from config.json (the one mapping), choose the
    precision, and say where the weights come from. Call once per run."""
    weights = weights_origin(cfg)
    path = find_hf_config(cfg)
    m = cfg.model
    args, dtype_from = _read(cfg, path) if path is not None else ({}, None)
    for field, value in MODEL_FALLBACKS.items():
        if field != "num_query_groups" and getattr(m, field, None) is None:  # None = MHA (heads)
            setattr(m, field, value)
    missing = [f for f in SHAPE if getattr(m, f, None) is None]
    if missing:
        raise ConfigError(f"model shape unknown: {', '.join(missing)} unset and no config.json found for "
                          f"--model ({m.model}) or --load ({m.load}); pass --model HF_DIR, or set them")
    if weights == "random" and os.environ.get("RANK", "0") == "0":
        log.warning("weights: random initialisation (%s)", "--load_safetensors false" if m.model
                    else "no --model or --load: pretraining from scratch")
    check_moe_layout(cfg)
    note = choose_precision(cfg, args.get("torch_dtype"), dtype_from)
    log.info("model: %s from %s; rotary_base %g; precision: %s", m.model_type or "gpt",
             path or "[model] fields", m.rotary_base, note)
    return ModelSource(path, args.get("vocab_size"), weights, note)


def _read(cfg, path: Path) -> tuple[dict, str | None]:
    """(model args of config.json, "FILE KEY=VALUE" naming where its dtype came from); fills cfg.model."""
    from hpctrain.checkpoint.locate import read_model_config
    from hpctrain.model.build import model_args_from_hf
    from hpctrain.model.families import hf_dtype

    hf, m = read_model_config(path), cfg.model
    args = model_args_from_hf(hf, where=str(path), tp=cfg.parallel.tensor_model_parallel_size,
                              padded_vocab_size=m.padded_vocab_size or _checkpoint_vocab(m.load))
    _apply(m, args, path)
    _apply_moe(cfg, args, path)
    if m.padded_vocab_size > args["vocab_size"]:
        log.warning("model: %d embedding rows for a vocabulary of %d (%s): the padding rows take part "
                    "in the softmax, so the loss differs slightly from the HF model's; a TP size that "
                    "divides vocab_size avoids it", m.padded_vocab_size, args["vocab_size"],
                    f"--load {m.load}" if m.load else f"TP={cfg.parallel.tensor_model_parallel_size}")
    name, key = hf_dtype(hf, str(path))
    return args, (f"{path} {key}={name}" if name else None)


def _apply(m, args: dict, path: Path) -> None:
    """Fill unset fields; a set field wins (logged when it differs); the family must agree."""
    if m.model_type is not None and m.model_type != args["model_type"]:
        raise ConfigError(f"model.model_type = {m.model_type!r} but {path} describes a "
                          f"{args['model_type']!r} model; drop --model_type (it is read from config.json)")
    for key, value in args.items():
        if key in NOT_FILLED or not hasattr(m, key):
            continue
        mine = getattr(m, key)
        if mine is None:
            setattr(m, key, value)
        elif mine != value:
            log.info("model: %s = %r (set by you; %s says %r)", key, mine, path, value)


def _apply_moe(cfg, args: dict, path: Path) -> None:
    """A MoE config.json fills the unset [moe] fields (a set field wins); a dense one refuses MoE
    layouts and shapes set by hand, which would build a different model than config.json's."""
    from hpctrain.model.families.base import MOE_ARG_KEYS

    moe = cfg.moe
    if not args.get("num_experts"):
        if moe.num_experts or moe.expert_model_parallel_size > 1:
            raise ConfigError(f"moe.num_experts / expert_model_parallel_size are set but {path} describes a dense "
                              f"{args['model_type']!r} model; drop the [moe] keys (a MoE model's config.json has them)")
        return
    for key in MOE_ARG_KEYS:
        value = args[key]
        if key == "moe_layer_freq":
            value = json.dumps(value)
        mine = getattr(moe, key)
        if mine is None:
            setattr(moe, key, value)
        elif mine != value:
            log.info("model: moe.%s = %r (set by you; %s says %r)", key, mine, path, value)


def check_moe_layout(cfg) -> None:
    """Expert parallel must fit the model and the ranks (called once the shape is known)."""
    moe, p = cfg.moe, cfg.parallel
    ep, etp = moe.expert_model_parallel_size, moe.expert_tensor_parallel_size or p.tensor_model_parallel_size
    if not moe.num_experts:
        if ep > 1 or moe.expert_tensor_parallel_size:
            raise ConfigError("moe.expert_model_parallel_size / expert_tensor_parallel_size need a MoE model "
                              "(num_experts is unset); drop them")
        return
    if moe.num_experts % ep:
        raise ConfigError(f"moe.expert_model_parallel_size = {ep} does not divide num_experts = {moe.num_experts}; "
                          "pick an EP that divides it")
    ffn = moe.moe_ffn_hidden_size
    if ffn and ffn % etp:
        raise ConfigError(f"moe.expert_tensor_parallel_size = {etp} does not divide moe_ffn_hidden_size = {ffn}; "
                          "pick an ETP that divides it")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        raise ConfigError(f"tensor_model_parallel_size = {p.tensor_model_parallel_size} on a MoE model needs "
                          "sequence_parallel = true (megatron-core's MoE layer refuses TP without SP in training): "
                          "add --sequence_parallel true")
    if p.context_parallel_size > 1:
        raise ConfigError("context_parallel_size > 1 with a MoE model is not built (the router's padding mask is "
                          "not split over CP here): use expert / tensor / pipeline parallel")
    if cfg.train.cuda_graph_impl != "none":
        raise ConfigError("cuda_graph_impl with a MoE model is not built (token routing changes shapes every "
                          "step): set cuda_graph_impl = none")
    if moe.moe_router_topk and moe.moe_router_topk > moe.num_experts:
        raise ConfigError(f"moe.moe_router_topk = {moe.moe_router_topk} > num_experts = {moe.num_experts}")


def choose_precision(cfg, hf_dtype: str | None, hf_where: str | None) -> str:
    """Set model.torch_dtype and precision.bf16/fp16; returns e.g. "bf16 (from X dtype=bfloat16)".
    The user's --torch_dtype, then --bf16/--fp16, then config.json's dtype, then fp32."""
    m, p = cfg.model, cfg.precision
    if m.torch_dtype is not None:
        how = f"--torch_dtype {m.torch_dtype}"
    elif p.bf16 or p.fp16 or (p.bf16 is False and p.fp16 is False):
        m.torch_dtype = "bfloat16" if p.bf16 else "float16" if p.fp16 else "float32"
        how = "--bf16" if p.bf16 else "--fp16" if p.fp16 else "--bf16 false --fp16 false"
    elif hf_dtype:
        m.torch_dtype, how = hf_dtype, hf_where
    else:
        m.torch_dtype, how = "float32", "the default: no dtype in config.json"
    apply_torch_dtype(cfg, m.torch_dtype)
    return f"{PRECISION[m.torch_dtype]} (from {how})"


def _checkpoint_vocab(load: str | None) -> int | None:
    """Embedding rows stored in the --load checkpoint (the vocabulary, padded where TP required it)."""
    if not load:
        return None
    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.convert_dcp import DcpReader

    ref = layout.find_latest(load)
    return int(DcpReader(ref.path).shape("embedding.word_embeddings.weight")[0]) if ref else None


def check_tokenizer(tokenizer, where: str, source: ModelSource, cfg) -> None:
    """Every token id must have an embedding row: refuse a tokenizer larger than the vocabulary."""
    n = len(tokenizer)
    rows = source.vocab_size or cfg.model.padded_vocab_size
    if rows is not None and n > rows:
        of = f"{source.config_path} vocab_size={rows}" if source.vocab_size else f"padded_vocab_size={rows}"
        raise ConfigError(f"tokenizer {where} has {n} tokens but the model's embedding has {rows} rows "
                          f"({of}): token ids >= {rows} have no embedding. Use the tokenizer that belongs "
                          "to the model (the files next to its config.json) or a model whose vocab_size "
                          f"is at least {n}")
