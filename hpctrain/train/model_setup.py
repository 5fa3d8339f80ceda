"""Build megatron-core's GPTModel for training from a JobConfig, under the current parallel state.

The architecture comes from cfg.model (filled from the HF config.json by
``hpctrain.train.model_source.fill_model_fields``: the families' one mapping); the training-side
switches (parallelism, recompute, fusions, precision) from the other sections. The layer spec comes from
``hpctrain.model.build.select_layer_spec`` (Transformer Engine's when installed and chosen, else
hpctrain's portable spec); ``cross_entropy_loss_fusion`` installs the chunked output layer + loss.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


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
    kw.update(moe_config(cfg))
    kw.update(t.extra_megatron_kwargs or {})
    return TransformerConfig(**kw)


def moe_config(cfg) -> dict:
    """TransformerConfig MoE fields from [moe] (filled from a MoE model's config.json); {} for a dense model."""
    from hpctrain.model.mcore_config import moe_kwargs

    moe = cfg.moe
    if not moe.num_experts:
        return {}
    kw = moe_kwargs(dict(num_experts=moe.num_experts, moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
                         moe_router_topk=moe.moe_router_topk, moe_router_pre_softmax=moe.moe_router_pre_softmax,
                         moe_layer_freq=moe.moe_layer_freq or 1, moe_aux_loss_coeff=moe.moe_aux_loss_coeff),
                    ep=moe.expert_model_parallel_size, etp=moe.expert_tensor_parallel_size)
    balancing = moe.moe_router_load_balancing_type
    kw.update(moe_router_dtype=None if moe.moe_router_dtype == "none" else moe.moe_router_dtype,
              moe_token_dispatcher_type=moe.moe_token_dispatcher_type, moe_grouped_gemm=bool(moe.moe_grouped_gemm),
              moe_router_load_balancing_type=balancing)
    if balancing == "none":
        kw["moe_aux_loss_coeff"] = 0.0
    return kw


def layer_spec(cfg, tcfg, vp_stage: int | None = None):
    """Transformer Engine's spec or hpctrain's portable spec (hpctrain.model.build decides)."""
    from hpctrain.model.build import select_layer_spec

    t = cfg.train
    spec = select_layer_spec(tcfg, recompute_act=t.recompute_granularity == "selective"
                             and "mlp_act" in t.recompute_modules, vp_stage=vp_stage)
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

    from hpctrain.model.mcore_config import gpt_model_kwargs

    m = cfg.model
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    model_kw = gpt_model_kwargs(dict(
        padded_vocab_size=m.padded_vocab_size,
        max_position_embeddings=m.max_position_embeddings or cfg.data.seq_length or 4096,
        position_embedding_type=m.position_embedding_type, rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base, rope_scaling=m.rope_scaling,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights))
    chunks = []
    for v in range(vpp):
        kw = dict(vp_stage=v) if vpp > 1 else {}
        spec = layer_spec(cfg, tcfg, vp_stage=v if vpp > 1 else None)  # a MoE block spec is per stage
        chunks.append(GPTModel(
            config=tcfg, transformer_layer_spec=spec,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw), **model_kw, **kw))
    if cfg.train.cross_entropy_loss_fusion and cfg.train.cross_entropy_fusion_impl == "native":
        _chunked_cross_entropy(chunks, m.padded_vocab_size // cfg.parallel.tensor_model_parallel_size)
    apply_tuner(cfg, chunks, tcfg.transformer_impl, bool(tcfg.num_moe_experts))
    _experts_apart(chunks, tcfg)
    return chunks


def apply_tuner(cfg, chunks: list, impl: str = "local", moe: bool = False) -> None:
    """train_type lora: adapters on the chosen linears, everything else frozen (model/lora/)."""
    from hpctrain.config import ConfigError
    from hpctrain.model.lora import lora_settings
    from hpctrain.model.lora.apply import apply_lora, check_uniform

    m = cfg.model
    settings = lora_settings(cfg.tuner, tied=not m.untie_embeddings_and_output_weights)
    if settings is None:
        return
    if moe:  # the adapters wrap the dense TP linears; expert linears (and their EP sharding) are not built
        raise ConfigError("train_type lora is not built for MoE models (this config.json has experts): "
                          "train them with train_type full")
    if impl == "transformer_engine":  # chosen because TE is installed and transformer_impl was left unset
        raise ConfigError("train_type lora runs on megatron-core's own tensor-parallel linears, not Transformer "
                          "Engine's (installed here): set transformer_impl = 'local'")
    check_uniform(settings, m.num_layers)
    names = [n for c in chunks for n in apply_lora(c, settings, cfg.train.seed, gated=bool(m.swiglu))]
    if "layernorm" in (cfg.train.recompute_modules or []) and cfg.train.recompute_granularity == "selective":
        for c in chunks:
            _embedding_output_needs_grad(c)
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in chunks for p in c.parameters())
    log.info("LoRA: rank %d, alpha %g%s on %d linears of this stage (%s); trainable %d of %d parameters "
             "(%.3f%%) on this rank", settings.rank, settings.alpha, " (rslora)" if settings.use_rslora else "",
             len(names), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})), trainable, total,
             100.0 * trainable / max(total, 1))


def _embedding_output_needs_grad(chunk) -> None:
    """megatron-core's ``layernorm`` recompute (CheckpointWithoutOutput) rebuilds the norm's output in
    the backward from the input it saved; on the first layer under LoRA that input is the frozen
    embedding's output, which needs no gradient, so autograd keeps nothing and the recompute fails.
    Marking that output as needing a gradient (what PEFT's ``enable_input_require_grads`` does for HF
    gradient checkpointing) costs layer 0's input gradient and no weight gradient."""
    emb = getattr(chunk, "embedding", None)
    if emb is None or any(p.requires_grad for p in emb.parameters()):
        return
    emb.register_forward_hook(lambda module, args, out: out.requires_grad_(True))


def _experts_apart(chunks: list, tcfg) -> None:
    """Expert parameters in the expert-data-parallel buffers and optimizer at every EP size.

    megatron-core tags expert weights ``allreduce = False`` (own grad buffers reduced over the
    expert-DP group, own optimizer in a ChainedOptimizer) only when EP > 1. At EP = 1 they would
    join the dense parameters: the optimizer checkpoint then has other keys ("optimizer.*" instead
    of "chained_1.optimizer.*"), so a run could not resume at another EP size, and with ETP < TP
    their gradients would be reduced over DP only although TP ranks hold copies. The expert-DP
    group is the right one at every EP (at EP = 1, ETP = TP it is the DP group)."""
    if not tcfg.num_moe_experts or tcfg.expert_model_parallel_size > 1:
        return
    for c in chunks:
        for name, p in c.named_parameters():
            if ".experts." in name:
                p.allreduce = False


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
