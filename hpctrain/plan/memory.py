"""Per-GPU memory estimate for one layout (the busiest pipeline stage), in bytes.

Parameters on one GPU (P): each transformer layer has
    norms        2h (RMSNorm; LayerNorm 4h)          replicated over TP
    QKV          h * (a + 2g) * d  (+ (a + 2g) * d bias when add_qkv_bias or biased linears)   / tp
    proj         a * d * h         (+ h bias when biased linears; replicated)                  / tp
    fc1          h * f * (2 if swiglu else 1) (+ bias)                                         / tp
    fc2          f * h             (+ h bias when biased linears; replicated)                  / tp
    qk_layernorm 2d
with h hidden, a heads, g query groups, d head dim, f ffn hidden size. Stage 0 also holds the
embedding V*h/tp; the last stage the final norm h and the output layer V*h/tp (when untied, or a
copy of the tied embedding when pp > 1).

Bytes per parameter (megatron-core DDP keeps fp32 main grads; Adam keeps fp32 master params,
m and v when training in bf16/fp16):
    weights  2P (bf16/fp16) or 4P (fp32)
    grads    4P
    optim    Adam: 12P mixed precision, 8P fp32; SGD: 8P mixed, 4P fp32;  divided by DP (x CP)
             with the distributed optimizer (it shards optimizer state over the DP x CP ranks).

Activations per layer per micro-batch, 2-byte values, s = seq_length / cp, b = micro_batch_size,
t = tp, t_sp = tp with sequence parallel else 1 - what the backward keeps, counted tensor by tensor
with tools/bench/act_memory.py on the portable spec and measured on an H200 (docs/benchmarks.md):
    attention  4sbh/t_sp (norm + QKV inputs) + 2sb(a + 2g)d/t (Q, K, V after RoPE) + 2sbad/t (the
               output, which is also the projection's input) + 4sba/t (fp32 log-sum-exp)
               + 5ba s^2/t (scores, softmax, dropout mask) only for an unfused attention whose core
               attention is not recomputed (the portable spec's flash/flex kernels keep none)
    mlp        4sbh/t_sp (norm + fc1 inputs) + 2sbf*(2 if swiglu else 1)/t (fc1 out, the SwiGLU input)
               + 2sbf/t (fc2 input) unless recompute_modules has "mlp_act"
    full recompute keeps only each layer's input 2sbh/t_sp, plus one layer's full activations while it
    is recomputed (recompute_method "block" with recompute_num_layers k: k layers store inputs only).
MoE layers (Qwen3-MoE): the experts' weights are split over EP x ETP (router replicated); with the
distributed optimizer their state is sharded over the expert-DP ranks (world / (pp * ep * etp)),
the dense parameters' over DP x CP; a MoE layer's MLP activations are its norm input, the router's
fp32 logits and, for the k routed copies of each token, the permuted input, fc1 and SwiGLU outputs
(see moe_mlp_activations). MoE layers are assumed spread evenly over the pipeline stages.
Stage 0 of a pipeline keeps min(pp, micro-batches) micro-batches in flight (1F1B schedule). The last
stage holds the logits: 6sbV/t (bf16 logits + fp32 copy for the loss); with the chunked cross entropy
(cross_entropy_loss_fusion) instead one chunk's logits and softmax (CHUNKED_CE_GIB) plus the output
layer's weight gradient while it is made (fp32 accumulator + bf16 result, 6Vh/t).
A fixed HEADROOM_GIB (CUDA context, NCCL buffers, allocator fragmentation) is subtracted from the
GPU's memory before comparing.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpctrain.plan.layout import Batch, Layout, stage_layers
from hpctrain.plan.shape import ModelShape

GIB = 1024 ** 3
HEADROOM_GIB = 4.0
# One chunk of the chunked cross entropy: 1 GiB of fp32 logits (portable/cross_entropy.py), their
# softmax in the backward and its bf16 copy; 2.5 GiB matched the 7B-shape runs on an H200.
CHUNKED_CE_GIB = 2.5


@dataclass(frozen=True)
class Training:
    """Training choices that change memory."""

    dtype_bytes: int = 2                    # 2 for bf16/fp16, 4 for fp32
    optimizer: str = "adam"
    use_distributed_optimizer: bool = True
    recompute_granularity: str | None = "selective"   # None, "selective", "full"
    recompute_method: str | None = None     # "uniform" or "block" (full recompute)
    recompute_num_layers: int | None = None
    recompute_core_attn: bool = True        # selective recompute includes "core_attn"
    recompute_mlp_act: bool = False         # selective recompute includes "mlp_act"
    unfused_attention: bool = False         # attention keeps the s x s scores (TE/local unfused backend)
    chunked_ce: bool = False                # cross_entropy_loss_fusion: logits made chunk by chunk
    lora_rank: int = 0                      # train_type lora: grads and optimizer state of the adapters only


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    gpu_bytes: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def usable(self) -> int | None:
        return None if self.gpu_bytes is None else self.gpu_bytes - int(HEADROOM_GIB * GIB)

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable


def layer_params(s: ModelShape, tp: int, moe: bool = False, lay: Layout | None = None) -> int:
    """Parameters of one layer on one GPU; a MoE layer's (``moe``) experts are split over EP x ETP
    (router replicated)."""
    if moe:
        dense_part = layer_params(s, tp) - (s.hidden_size * s.ffn_hidden_size * (3 if s.swiglu else 2)) // tp
        ep, etp = (lay.ep, lay.expert_tp) if lay is not None else (1, tp)
        experts = s.num_experts // ep * 3 * s.hidden_size * s.moe_ffn_hidden_size // etp
        return dense_part + s.num_experts * s.hidden_size + experts
    h, a, g, d, f = s.hidden_size, s.num_attention_heads, s.num_query_groups, s.kv_channels, s.ffn_hidden_size
    biased = not s.disable_bias_linear
    norm = 2 * h * (2 if s.normalization == "LayerNorm" else 1)
    qkv = h * (a + 2 * g) * d + ((a + 2 * g) * d if (s.add_qkv_bias or biased) else 0)
    proj = a * d * h
    fc1_out = f * (2 if s.swiglu else 1)
    fc1 = h * fc1_out + (fc1_out if biased else 0)
    fc2 = f * h
    replicated = norm + (2 * h if biased else 0) + (2 * d if s.qk_layernorm else 0)
    return (qkv + proj + fc1 + fc2) // tp + replicated


def lora_layer_params(s: ModelShape, tp: int, r: int) -> int:
    """Adapter parameters of one layer on one GPU (all four linears: the all-linear default)."""
    h, a, g, d, f = s.hidden_size, s.num_attention_heads, s.num_query_groups, s.kv_channels, s.ffn_hidden_size
    split = (a + 2 * g) * d + a * d + f * (2 if s.swiglu else 1) + f  # B rows of qkv/fc1, A columns of proj/fc2
    whole = 4 * h                                                      # A of qkv/fc1, B of proj/fc2
    return r * (split // tp + whole)


def stage_moe_layers(s: ModelShape, layers_on_stage: int) -> int:
    """MoE layers on a stage (MoE layers assumed spread evenly over the model)."""
    return round(layers_on_stage * s.moe_layers / s.num_layers) if s.moe_layers else 0


def stage_expert_params(s: ModelShape, lay: Layout, layers_on_stage: int) -> int:
    """Expert weights on one GPU of a stage: their optimizer state is sharded over expert-DP."""
    n = stage_moe_layers(s, layers_on_stage)
    return n * (s.num_experts // lay.ep) * 3 * s.hidden_size * s.moe_ffn_hidden_size // lay.expert_tp


def stage_params(s: ModelShape, lay: Layout, layers_on_stage: int, first: bool, last: bool) -> int:
    """Parameters on one GPU of one pipeline stage."""
    n_moe = stage_moe_layers(s, layers_on_stage)
    p = (layers_on_stage - n_moe) * layer_params(s, lay.tp) + n_moe * layer_params(s, lay.tp, True, lay)
    emb = s.vocab_size * s.hidden_size // lay.tp
    if first:
        p += emb
    if last:
        p += s.hidden_size * (2 if s.normalization == "LayerNorm" else 1)
        if s.untie_embeddings_and_output_weights or lay.pp > 1:
            p += emb
    return p


def layer_activations(s: ModelShape, lay: Layout, batch: Batch, scores_stored: bool,
                      mlp_act_stored: bool = True) -> int:
    sq, b = batch.seq_length // lay.cp, batch.micro_batch_size
    h, a, g, d, f = s.hidden_size, s.num_attention_heads, s.num_query_groups, s.kv_channels, s.ffn_hidden_size
    t = lay.tp
    t_sp = t if (batch.sequence_parallel and t > 1) else 1
    attn = 4 * sq * b * h // t_sp + 2 * sq * b * (a + 2 * g) * d // t + 2 * sq * b * a * d // t \
        + 4 * sq * b * a // t
    if scores_stored:
        attn += 5 * b * a * sq * sq // t
    return attn + dense_mlp_activations(s, lay, batch, mlp_act_stored)


def dense_mlp_activations(s: ModelShape, lay: Layout, batch: Batch, mlp_act_stored: bool = True) -> int:
    sq, b, f, t = batch.seq_length // lay.cp, batch.micro_batch_size, s.ffn_hidden_size, lay.tp
    t_sp = t if (batch.sequence_parallel and t > 1) else 1
    mlp = 4 * sq * b * s.hidden_size // t_sp + 2 * sq * b * f * (2 if s.swiglu else 1) // t
    if mlp_act_stored:
        mlp += 2 * sq * b * f // t
    return mlp


def moe_mlp_activations(s: ModelShape, lay: Layout, batch: Batch) -> int:
    """A MoE layer's MLP part per micro-batch in place of the dense MLP's: the norm input, the router's
    fp32 logits, and for the k routed copies of each token their permuted input (2kh), fc1 output
    (2k * 2f / etp) and SwiGLU output (2kf / etp)."""
    sq, b = batch.seq_length // lay.cp, batch.micro_batch_size
    t_sp = lay.tp if (batch.sequence_parallel and lay.tp > 1) else 1
    k, f, h, etp = s.moe_router_topk, s.moe_ffn_hidden_size, s.hidden_size, lay.expert_tp
    tokens = sq * b // t_sp
    return 4 * tokens * h + 4 * tokens * s.num_experts + tokens * k * (2 * h + 6 * f // etp)


def stage_activations(s: ModelShape, lay: Layout, batch: Batch, tr: Training, layers: int, last: bool) -> int:
    """Activation bytes of one micro-batch on a stage with ``layers`` transformer layers."""
    t_sp = lay.tp if (batch.sequence_parallel and lay.tp > 1) else 1
    sq, b = batch.seq_length // lay.cp, batch.micro_batch_size
    layer_input = 2 * sq * b * s.hidden_size // t_sp
    if tr.recompute_granularity == "full":
        full = layer_activations(s, lay, batch, scores_stored=tr.unfused_attention)
        k = layers if tr.recompute_method != "block" else min(tr.recompute_num_layers or layers, layers)
        acts = k * layer_input + (layers - k) * full + full
    else:
        selective = tr.recompute_granularity == "selective"
        acts = layers * layer_activations(
            s, lay, batch, scores_stored=tr.unfused_attention and not (selective and tr.recompute_core_attn),
            mlp_act_stored=not (selective and tr.recompute_mlp_act))
        n_moe = stage_moe_layers(s, layers)
        if n_moe:  # swap the dense MLP part of those layers for the MoE one
            dense_mlp = dense_mlp_activations(s, lay, batch, not (selective and tr.recompute_mlp_act))
            acts += n_moe * (moe_mlp_activations(s, lay, batch) - dense_mlp)
    if last:
        if tr.chunked_ce:
            acts += int(CHUNKED_CE_GIB * GIB) + 6 * s.vocab_size * s.hidden_size // lay.tp
        else:
            acts += 6 * sq * b * s.vocab_size // lay.tp
    return acts


def optimizer_bytes_per_param(tr: Training) -> int:
    mixed = tr.dtype_bytes < 4
    if tr.optimizer == "adam":
        return 12 if mixed else 8
    return 8 if mixed else 4


def estimate(s: ModelShape, lay: Layout, batch: Batch, tr: Training, gpu_bytes: int | None = None) -> MemoryEstimate:
    """Memory of the busiest GPU (max over pipeline stages of weights + grads + optimizer + activations)."""
    layers = stage_layers(s.num_layers, lay.pp, batch.decoder_first_pipeline_num_layers,
                          batch.decoder_last_pipeline_num_layers)
    num_micro = max(1, batch.global_batch_size // max(1, batch.micro_batch_size * lay.dp))
    best: MemoryEstimate | None = None
    for i, n in enumerate(layers):
        first, last = i == 0, i == len(layers) - 1
        p = stage_params(s, lay, n, first, last)
        trained = n * lora_layer_params(s, lay.tp, tr.lora_rank) if tr.lora_rank else p  # LoRA: base frozen
        experts = 0 if tr.lora_rank else stage_expert_params(s, lay, n)  # LoRA is not built for MoE
        optim = (trained - experts) * optimizer_bytes_per_param(tr)
        expert_optim = experts * optimizer_bytes_per_param(tr)
        if tr.use_distributed_optimizer:  # dense state over DP x CP, expert state over expert-DP
            optim //= lay.dp * lay.cp
            expert_optim //= lay.expert_dp
        optim += expert_optim
        in_flight = min(lay.pp - i, num_micro)   # 1F1B: stage i holds up to pp - i micro-batches
        acts = in_flight * stage_activations(s, lay, batch, tr, n, last)
        est = MemoryEstimate(p, p * tr.dtype_bytes, 4 * trained, optim, acts,
                             gpu_bytes)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best
