"""Output layer + vocab-parallel cross entropy, chunked over tokens (`cross_entropy_loss_fusion`).

megatron-core's GPTModel first materialises the logits [s, b, V/tp] in the model dtype and then the
cross entropy makes fp32 working copies of them: for Qwen2.5 (V = 151,936) and 8,192 tokens that is
2.5 GB of bf16 logits plus 5-10 GB of fp32 temporaries per micro-batch. Here the output projection
and the loss run together, CHUNK tokens at a time: each chunk's logits are turned straight into the
loss and the input and weight gradients (for a mean over the counted tokens; the backward scales
them). Peak extra memory: one chunk of fp32 logits and the fp32 weight-gradient sum.

Vocab parallel: each TP rank holds V/tp rows of the output weight; the max, the sum of exponentials
and the target logit are all-reduced over TP, as in megatron's vocab_parallel_cross_entropy.
"""
from __future__ import annotations

import inspect
import types
import warnings
import torch
import torch.distributed as dist

from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

DEFAULT_CHUNK_TOKENS = 4096


def _vocab_range(weight: torch.Tensor, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    start = rank * weight.shape[0]
    return start, start + weight.shape[0]


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _local_stats(logits, idx, local):
    """Log-sum-exp over this rank's vocab slice and the target logit (0 where not local)."""
    lf = logits.float()
    return torch.logsumexp(lf, dim=-1), lf.gather(1, idx[:, None]).squeeze(1) * local


def _grad_logits(logits, lse, idx, local, grad):
    """(softmax - onehot) * grad_loss, in the logits' dtype: d loss / d logits (eager version)."""
    p = (logits.float() - lse[:, None]).exp()
    p.scatter_add_(1, idx[:, None], -local.to(p.dtype)[:, None])
    return (p * grad[:, None].float()).to(logits.dtype)


def _grad_logits_pointwise(logits, lse, idx, local, grad):
    """The same numbers with the one-hot as a comparison with the column index: all elementwise, so
    the compiled version is one read of the logits and one write. (Compiled, the scatter_add split it
    into two kernels with an fp32 [chunk, V] tensor between them: ~2.5 ms of a 92 ms step on the
    Qwen3-1.7B shape cut to 8 layers; eager on the CPU the comparison is the slower one.)"""
    cols = torch.arange(logits.shape[1], device=logits.device)
    onehot = (cols[None, :] == idx[:, None]) & local[:, None]
    p = (logits.float() - lse[:, None]).exp() - onehot.float()
    return (p * grad[:, None].float()).to(logits.dtype)


class _Fused:
    """torch.compile'd versions of the elementwise passes on CUDA (one fused read of the logits
    instead of ~4 passes each); eager elsewhere, or if compiling fails (with a warning)."""

    def __init__(self, fn, to_compile=None):
        self.fn, self.to_compile, self.compiled, self.failed = fn, to_compile or fn, None, False

    def __call__(self, *args):
        if args[0].is_cuda and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.to_compile, dynamic=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, same math
                warnings.warn(f"chunked cross entropy: torch.compile failed ({e!r}); using eager")
                self.failed = True
        return self.fn(*args)


_local_stats_fused = _Fused(_local_stats)
_grad_logits_fused = _Fused(_grad_logits, _grad_logits_pointwise)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss[n] = logsumexp(x[n] @ W.T) - (x[n] @ W.T)[target[n]] over the full (TP-split) vocab.

    The gradients are made in the forward, chunk by chunk, while the chunk's logits are at hand:
    dL/dx and dL/dW for a loss that weighs every counted token (``valid``) the same, as a mean over
    the tokens does. The backward only scales them by that weight. Recomputing the logits in the
    backward instead cost one more [chunk, h] x [h, V] matmul per chunk (~5 of an 85 ms step on the
    Qwen3-1.7B shape cut to 8 layers, docs/benchmarks.md); keeping the gradients costs no more peak
    memory than the backward's own fp32 weight-gradient sum, which now lives from this forward to its
    backward (the next thing autograd runs). A loss that weighs counted tokens differently (per-token
    weights) is not this function's: its backward refuses it (an asynchronous device assert)."""

    @staticmethod
    def forward(ctx, x, weight, target, valid, group, chunk, need_x, need_w):
        start, end = _vocab_range(weight, group)
        n = x.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        vf = valid.to(torch.float32)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            t = target[a:b]
            local = (t >= start) & (t < end)
            idx = (t - start).clamp(0, end - start - 1)
            logits = x[a:b] @ weight.t()
            part_lse, tgt = _local_stats_fused(logits, idx, local)
            if group is not None:  # combine the ranks' slices: lse = m + log sum_r exp(lse_r - m)
                m = part_lse.clone()
                _all_reduce(m, group, dist.ReduceOp.MAX)
                both = torch.stack([(part_lse - m).exp(), tgt])
                _all_reduce(both, group)  # [sum of exp, target logit] in one collective
                part_lse, tgt = both[0].log() + m, both[1]
            loss[a:b] = part_lse - tgt
            if need_x or need_w:  # (softmax - onehot) on the counted tokens, 0 on the others
                g = _grad_logits_fused(logits, part_lse, idx, local, vf[a:b])
                if need_x:
                    grad_x[a:b] = g @ weight
                if need_w:
                    grad_w = _add_wgrad(grad_w, g.t(), x[a:b])
        ctx.save_for_backward(*(t for t in (grad_x, grad_w) if t is not None), vf)
        ctx.need, ctx.w_dtype = (need_x, need_w), weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        vf = saved.pop()
        need_x, need_w = ctx.need
        grad_x = saved.pop(0) if need_x else None
        grad_w = saved.pop(0) if need_w else None
        # the loss's weight per counted token, and the check that it is one weight for all of them
        scale = (grad_loss * vf).sum() / vf.sum().clamp_min(1.0)
        off = (grad_loss - scale * vf).abs().max()
        torch._assert_async(off <= 1e-5 * grad_loss.abs().max() + 1e-30,
                            "chunked cross entropy: the loss weighs counted tokens differently; it supports "
                            "a mean over the tokens of its loss_mask only")
        gx = (grad_x * scale).to(grad_x.dtype) if need_x else None
        gw = (grad_w * scale).to(ctx.w_dtype) if need_w else None
        return gx, gw, None, None, None, None, None, None


_FP32_OUT: dict = {}


def _add_wgrad(acc: torch.Tensor | None, gt: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """acc + gt @ xc, summed in fp32 over the chunks.

    On CUDA the bf16 product goes straight into the fp32 sum (addmm with out_dtype: cuBLAS reads the
    sum and writes it once). The product in bf16, then a cast and an add, moved ~5 GB per chunk for
    Qwen's [151936, 2048] output weight: ~10 of a 92 ms step on the Qwen3-1.7B shape cut to 8 layers
    (torch.profiler, docs/benchmarks.md). Elsewhere, or where that addmm is missing: product, cast, add."""
    if gt.is_cuda and gt.dtype in (torch.bfloat16, torch.float16) and _FP32_OUT.get("ok", True):
        try:
            return (torch.mm(gt, xc, out_dtype=torch.float32) if acc is None
                    else torch.addmm(acc, gt, xc, out_dtype=torch.float32))
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm's out_dtype
            _FP32_OUT["ok"] = False
    prod = (gt @ xc).float()
    return prod if acc is None else acc.add_(prod)


def chunked_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                         labels: torch.Tensor, tp_group=None,
                                         sequence_parallel: bool = False,
                                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                         loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from decoder output hidden [s(/tp), b, h] and the output weight.

    The gradient must reach the per-token loss as one weight for every token of ``loss_mask`` [b, s]
    (all tokens when None) and none for the others: a mean over the counted tokens, as the trainer's
    loss is (see _ChunkedLinearCrossEntropy).

    weight is this TP rank's [V/tp, h] slice; labels [b, s] (values outside 0..V-1 such as -100 give
    a finite loss that the caller masks out, as with megatron's loss). Under sequence parallel the
    hidden states are first all-gathered over TP (reduce-scattered in backward); otherwise their
    gradient is all-reduced over TP, exactly as the ColumnParallelLinear output layer would do.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    if sequence_parallel and tp > 1:
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    x = hidden.reshape(s * b, h)
    target = labels.transpose(0, 1).reshape(s * b)
    counted = (torch.ones_like(target, dtype=torch.bool) if loss_mask is None
               else loss_mask.transpose(0, 1).reshape(s * b).bool())
    grad = torch.is_grad_enabled()
    loss = _ChunkedLinearCrossEntropy.apply(x, weight, target, counted, tp_group if tp > 1 else None,
                                            chunk_tokens, grad and x.requires_grad, grad and weight.requires_grad)
    return loss.view(s, b).transpose(0, 1).contiguous()


def enable_chunked_cross_entropy(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Make a megatron GPTModel compute its training loss with the chunked fused output layer + CE.

    Only the loss path changes (labels given, no MTP, not inference): logits requests go through
    megatron-core's own code. Returns the model. Call it on each model chunk with post_process.
    """
    original = model._postprocess
    sig = inspect.signature(original)

    def _postprocess(self, *args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        arg = bound.arguments
        if (arg.get("labels") is None or not self.post_process or arg.get("mtp_in_postprocess")
                or self.config.mtp_num_layers is not None or arg.get("inference_context") is not None
                or arg.get("inference_params") is not None):
            return original(*args, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return chunked_vocab_parallel_cross_entropy(
            arg["hidden_states"], weight, arg["labels"], tp_group=self.pg_collection.tp,
            sequence_parallel=bool(self.output_layer.sequence_parallel), chunk_tokens=chunk_tokens,
            loss_mask=arg.get("loss_mask"))

    model._postprocess = types.MethodType(_postprocess, model)
    return model


def chunk_tokens_for(vocab_per_rank: int, budget_bytes: int = 1 << 30) -> int:
    """Chunk size whose fp32 logits stay within budget_bytes (default 1 GiB), at least 256 tokens."""
    return max(256, budget_bytes // (4 * max(1, vocab_per_rank)))


__all__ = ["chunked_vocab_parallel_cross_entropy", "enable_chunked_cross_entropy",
           "chunk_tokens_for", "DEFAULT_CHUNK_TOKENS"]
