"""Build megatron-core's GPTModel for training from a JobConfig, under the current parallel state.

The architecture comes from cfg.model (filled from the HF config.json next to the model / the
checkpoint when the user left a field unset); the training-side switches (parallelism, recompute,
fusions, precision) from the other sections. The layer spec comes from
``hpctrain.model.build.select_layer_spec`` (Transformer Engine's when installed and chosen, else
hpctrain's portable spec); ``cross_entropy_loss_fusion`` installs the chunked output layer + loss.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# HF config.json key -> cfg.model field (only used to fill fields the user left unset).
_HF_KEYS = {
    "num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups", "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rotary_base", "rms_norm_eps": "norm_epsilon", "vocab_size": "padded_vocab_size",
    "head_dim": "kv_channels", "rope_scaling": "rope_scaling",
}
_FALLBACK = {"position_embedding_type": "rope", "rotary_base": 10000.0, "rotary_percent": 1.0,
             "normalization": "RMSNorm", "norm_epsilon": 1e-5, "swiglu": True, "disable_bias_linear": True,
             "attention_dropout": 0.0, "hidden_dropout": 0.0, "qk_layernorm": False}


def find_hf_config(cfg) -> Path | None:
    """config.json of the model: next to cfg.model.model, or in the root of cfg.model.load."""
    for base in (cfg.model.model, cfg.model.load):
        if not base:
            continue
        p = Path(base)
        p = p if p.is_dir() else p.parent
        for cand in (p / "config.json", p.parent / "config.json"):
            if cand.is_file():
                return cand
    return None


def fill_model_fields(cfg) -> dict:
    """Fill unset cfg.model shape fields from config.json; returns the HF config (or {})."""
    path = find_hf_config(cfg)
    hf: dict[str, Any] = json.loads(path.read_text()) if path else {}
    m = cfg.model
    if m.padded_vocab_size is None and m.load:
        m.padded_vocab_size = _checkpoint_vocab(m.load)
    for hk, field in _HF_KEYS.items():
        if getattr(m, field, None) is None and hf.get(hk) is not None:
            setattr(m, field, hf[hk])
    if m.untie_embeddings_and_output_weights is None:
        m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
    if m.add_qkv_bias is None:
        m.add_qkv_bias = hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False))
    if m.torch_dtype is None and hf.get("torch_dtype"):
        m.torch_dtype = hf["torch_dtype"]
    for field, value in _FALLBACK.items():
        if getattr(m, field, None) is None:
            setattr(m, field, value)
    missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
               if getattr(m, f, None) is None]
    if missing:
        raise ValueError(f"model shape unknown: {', '.join(missing)} unset and no config.json found next to "
                         f"--model ({m.model}) or --load ({m.load}); pass --model HF_DIR or set them")
    return hf


def _checkpoint_vocab(load: str) -> int | None:
    """Padded vocab of the embedding stored in the checkpoint (conversion pads it for TP)."""
    try:
        from hpctrain.checkpoint import layout
        from hpctrain.checkpoint.convert_dcp import DcpReader
        ref = layout.find_latest(load)
        return int(DcpReader(ref.path).shape("embedding.word_embeddings.weight")[0]) if ref else None
    except (ImportError, KeyError, OSError, ValueError) as e:
        log.debug("vocab size from %s unavailable: %s", load, e)
        return None


def params_dtype(cfg) -> torch.dtype:
    if cfg.precision.bf16:
        return torch.bfloat16
    if cfg.precision.fp16:
        return torch.float16
    return torch.float32


def _fusion_flags(cfg, device_type: str) -> dict:
    """Fusion switches, with a logged fallback where this environment cannot honour them."""
    t = cfg.train
    have_te = _have("transformer_engine")
    out = dict(masked_softmax_fusion=not t.no_masked_softmax_fusion,
               bias_dropout_fusion=not t.no_bias_dropout_fusion,
               bias_activation_fusion=not t.no_bias_swiglu_fusion,
               apply_rope_fusion=not t.no_rope_fusion and have_te,
               gradient_accumulation_fusion=not t.no_gradient_accumulation_fusion and _have("fused_weight_gradient_mlp_cuda"))
    if not t.no_rope_fusion and not have_te:
        log.info("rope fusion needs Transformer Engine: using unfused RoPE")
    if not t.no_gradient_accumulation_fusion and not out["gradient_accumulation_fusion"]:
        log.info("gradient_accumulation_fusion needs apex: using unfused weight-gradient accumulation")
    if device_type == "cpu":
        # megatron-core's fused softmax / bias-dropout kernels are CUDA (jit/triton) kernels.
        out.update(masked_softmax_fusion=False, bias_dropout_fusion=False, bias_activation_fusion=False)
    if t.cross_entropy_loss_fusion and t.cross_entropy_fusion_impl == "te" and not have_te:
        raise ValueError("cross_entropy_fusion_impl='te' needs Transformer Engine; use 'native'")
    return out


def _have(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _no_init(weight) -> None:
    """no_initialization: leave the weight as allocated (the checkpoint loaded next overwrites it)."""


def transformer_config(cfg, device_type: str):
    """megatron-core TransformerConfig for this job."""
    from megatron.core.transformer import TransformerConfig

    m, p, t, pr = cfg.model, cfg.parallel, cfg.train, cfg.precision
    heads = m.num_attention_heads
    # group_query_attention = false: one KV head per query head (Megatron-LM ignores num_query_groups then)
    groups = m.num_query_groups if m.num_query_groups and m.group_query_attention is not False else heads
    dtype = params_dtype(cfg)
    kw = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=m.kv_channels,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=bool(m.swiglu), activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=not m.disable_bias_linear, add_qkv_bias=bool(m.add_qkv_bias),
        attention_dropout=m.attention_dropout, hidden_dropout=m.hidden_dropout, qk_layernorm=bool(m.qk_layernorm),
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        deterministic_mode=t.deterministic_mode, calculate_per_token_loss=t.calculate_per_token_loss,
        # megatron's own fused CE only for the TE implementation; 'native' is hpctrain's chunked
        # output layer + CE, installed on the model in build_model_chunks.
        cross_entropy_loss_fusion=bool(t.cross_entropy_loss_fusion and t.cross_entropy_fusion_impl == "te"),
        cross_entropy_fusion_impl=t.cross_entropy_fusion_impl,
        bf16=bool(pr.bf16), fp16=bool(pr.fp16), params_dtype=dtype, pipeline_dtype=dtype,
        attention_softmax_in_fp32=pr.attention_softmax_in_fp32,
        apply_query_key_layer_scaling=bool(pr.apply_query_key_layer_scaling),
        use_cpu_initialization=bool(m.use_cpu_initialization) or device_type == "cpu",
        perform_initialization=True,
    )
    if m.no_initialization and m.load:
        # The weights come from --load: skip the random init. Not with perform_initialization=False:
        # megatron-core 0.16 then never tags the TP-split weights (tensor_model_parallel), and the grad
        # and parameter norms at TP > 1 count only TP rank 0's shards. A no-op init keeps the tags.
        kw.update(init_method=_no_init, output_layer_init_method=_no_init, embedding_init_method=_no_init)
    if t.recompute_granularity == "selective":
        # "mlp_act" is hpctrain's (the portable MLP reads it from the layer spec), not megatron-core's.
        kw["recompute_modules"] = [m for m in t.recompute_modules if m != "mlp_act"]
    if t.recompute_granularity == "full" and t.recompute_method is None:
        kw["recompute_method"] = "uniform"
        kw["recompute_num_layers"] = t.recompute_num_layers or 1
    kw["transformer_impl"] = m.transformer_impl or ("transformer_engine" if _have("transformer_engine") else "local")
    if kw["transformer_impl"] == "transformer_engine":
        from megatron.core.transformer.enums import AttnBackend
        kw["attention_backend"] = AttnBackend[t.attention_backend]
    kw.update(_fusion_flags(cfg, device_type))
    kw.update(t.extra_megatron_kwargs or {})
    return TransformerConfig(**kw)


def layer_spec(cfg, tcfg):
    """Transformer Engine's spec or hpctrain's portable spec (hpctrain.model.build decides)."""
    from hpctrain.model.build import select_layer_spec

    t = cfg.train
    spec = select_layer_spec(tcfg, recompute_act=t.recompute_granularity == "selective"
                             and "mlp_act" in t.recompute_modules)
    if tcfg.transformer_impl != "transformer_engine":
        _portable_attention_backend(cfg.train.attention_backend)
    return spec


# attention_backend (Megatron's names) -> the portable attention's kernel choice. Without TE there
# is no TE flash/fused/unfused DotProductAttention: SDPA picks flash/cuDNN kernels itself.
_PORTABLE_BACKEND = {"flash": "auto", "fused": "auto", "auto": "auto", "unfused": "sdpa", "local": "sdpa"}


def _portable_attention_backend(name: str) -> None:
    from hpctrain.model.portable import PortableAttention

    PortableAttention.backend = _PORTABLE_BACKEND[name]
    if name in ("flash", "fused"):
        log.info("attention_backend=%s without Transformer Engine: portable attention (SDPA flash/cuDNN "
                 "kernels; packed samples through flex_attention on CUDA)", name)
    elif name in ("unfused", "local"):
        log.info("attention_backend=%s: portable attention with explicit masks (SDPA, no flex_attention)", name)


def build_model_chunks(cfg, tcfg) -> list:
    """GPTModel chunk(s) for this pipeline rank (one per virtual stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    spec = layer_spec(cfg, tcfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for v in range(vpp):
        kw = dict(vp_stage=v) if vpp > 1 else {}
        chunks.append(GPTModel(
            config=tcfg, transformer_layer_spec=spec, vocab_size=m.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings or cfg.data.seq_length or 4096,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type, rotary_percent=m.rotary_percent,
            rotary_base=int(m.rotary_base), **_rope_scaling(m), **kw))
    if cfg.train.cross_entropy_loss_fusion and cfg.train.cross_entropy_fusion_impl == "native":
        _chunked_cross_entropy(chunks, m.padded_vocab_size // cfg.parallel.tensor_model_parallel_size)
    return chunks


def _chunked_cross_entropy(chunks: list, vocab_per_rank: int) -> None:
    """cross_entropy_loss_fusion (native): the output projection and the vocab-parallel cross
    entropy run together in token chunks, so the [tokens, vocab] logits are never materialised
    (for a 152k vocabulary they dominate activation memory; see portable/cross_entropy.py)."""
    from hpctrain.model.portable.cross_entropy import chunk_tokens_for, enable_chunked_cross_entropy

    tokens = chunk_tokens_for(vocab_per_rank)
    for c in chunks:
        if c.post_process:
            enable_chunked_cross_entropy(c, tokens)
    log.info("cross_entropy_loss_fusion: chunked output layer + cross entropy (%d tokens per chunk)", tokens)


def _rope_scaling(m) -> dict:
    rs = m.rope_scaling
    if not rs:
        return {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported by megatron-core's GPTModel "
                         "(supported: llama3)")
    return dict(rope_scaling=True, rope_scaling_factor=float(rs.get("factor", 8.0)))


def wrap_ddp(cfg, tcfg, chunks: list) -> list:
    """megatron-core DDP around each chunk (grad buffers, DP reduce, distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    p = cfg.parallel
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather, use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None)
    out = []
    for i, c in enumerate(chunks):
        out.append(DistributedDataParallel(tcfg, ddp_cfg, c,
                                           disable_bucketing=i > 0))
    return out
