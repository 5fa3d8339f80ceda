"""Derived defaults, the way Megatron-SWIFT fills them, in one explicit step after parsing.

resolve() only fills values that are still unset (None). It does no file I/O; values that need the
model's config.json or the dataset size (max_length from max_position_embeddings, train_iters from
max_epochs, transformer_impl and distributed_backend from the machine) are filled by the trainer with
the helpers at the end of this module.
"""
from __future__ import annotations

import os

from hpctrain.config.job import JobConfig

ENV_FIELDS = {  # environment variable -> launch field, as the seed's launcher reads them
    "NPROC_PER_NODE": "nproc_per_node", "NNODES": "nnodes", "NODE_RANK": "node_rank",
    "MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port", "CUDA_VISIBLE_DEVICES": "cuda_visible_devices",
}


def model_basename(cfg: JobConfig) -> str | None:
    """Last path component of --model (else --load), as Megatron-SWIFT names the output dir."""
    src = cfg.model.model or cfg.model.load
    if not src:
        return None
    name = os.path.basename(os.path.normpath(src))
    return os.path.splitext(name)[0] if name.endswith(".gguf") else name


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill derived defaults in place and return cfg. Idempotent."""
    d, t, ck, p = cfg.data, cfg.train, cfg.checkpoint, cfg.precision
    if d.seq_length is None:
        d.seq_length = d.max_length
    if d.packing_length is None:
        d.packing_length = d.max_length
    if t.lr is None:
        t.lr = 1e-4 if cfg.tuner.train_type == "lora" else 1e-5
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters
    if cfg.eval.eval_interval is None:
        cfg.eval.eval_interval = ck.save_interval
    if ck.save is None and t.mode in ("sft", "pt") and model_basename(cfg):
        ck.save = os.path.join("megatron_output", model_basename(cfg))
    apply_torch_dtype(cfg, cfg.model.torch_dtype)
    if p.bf16 and p.fp16 is None:
        p.fp16 = False
    if p.fp16 and p.bf16 is None:
        p.bf16 = False
    return cfg


def apply_torch_dtype(cfg: JobConfig, torch_dtype: str | None) -> None:
    """Set fp16/bf16 from a torch dtype name where the user left them unset (e.g. from config.json)."""
    if torch_dtype is None:
        return
    if cfg.model.torch_dtype is None:
        cfg.model.torch_dtype = torch_dtype
    p = cfg.precision
    if p.fp16 is None and p.bf16 is None:
        p.fp16 = torch_dtype == "float16"
        p.bf16 = torch_dtype == "bfloat16"
    elif p.fp16 is None:
        p.fp16 = False if p.bf16 else torch_dtype == "float16"
    elif p.bf16 is None:
        p.bf16 = False if p.fp16 else torch_dtype == "bfloat16"


def env_overrides(environ: dict[str, str]) -> dict[tuple[str, str], object]:
    """Launch fields from NPROC_PER_NODE / CUDA_VISIBLE_DEVICES / NNODES / ... (typed, validated)."""
    from hpctrain.config.coerce import coerce

    out = {}
    for var, name in ENV_FIELDS.items():
        value = environ.get(var)
        if value is None or value == "":
            continue
        out[("launch", name)] = coerce("launch", name, value, from_cli=True,
                                       where=f"environment variable {var}")
    return out


def default_backend(cuda_available: bool) -> str:
    """distributed_backend when the user left it unset: nccl with CUDA, gloo on CPU."""
    return "nccl" if cuda_available else "gloo"


def default_transformer_impl() -> str:
    """transformer_impl when unset: Transformer Engine when it is installed, else megatron-core's local spec."""
    import importlib.util

    return "transformer_engine" if importlib.util.find_spec("transformer_engine") else "local"
