"""Output layer + vocab-parallel cross entropy, chunked over tokens (`cross_entropy_loss_fusion`).

megatron-core's GPTModel first materialises the logits [s, b, V/tp] in the model dtype and then the
cross entropy makes fp32 working copies of them: for Qwen2.5 (V = 151,936) and 8,192 tokens that is
2.5 GB of bf16 logits plus 5-10 GB of fp32 temporaries per micro-batch. Here the output projection
and the loss run together, CHUNK tokens at a time: forward keeps only the per-token log-sum-exp;
backward recomputes each chunk's logits (one extra [chunk, h] x [h, V/tp] matmul) and turns them
straight into the input and weight gradients. Peak extra memory: one chunk of fp32 logits.

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
    """(softmax - onehot) * grad_loss, in the logits' dtype: d loss / d logits."""
    p = (logits.float() - lse[:, None]).exp()
    p = p.scatter_add(1, idx[:, None], -local.to(p.dtype)[:, None])
    return (p * grad[:, None].float()).to(logits.dtype)


class _Fused:
    """torch.compile'd versions of the elementwise passes on CUDA (one fused read of the logits
    instead of ~4 passes each); eager elsewhere, or if compiling fails (with a warning)."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if args[0].is_cuda and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, same math
                warnings.warn(f"chunked cross entropy: torch.compile failed ({e!r}); using eager")
                self.failed = True
        return self.fn(*args)


_local_stats_fused = _Fused(_local_stats)
_grad_logits_fused = _Fused(_grad_logits)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss[n] = logsumexp(x[n] @ W.T) - (x[n] @ W.T)[target[n]] over the full (TP-split) vocab."""

    @staticmethod
    def forward(ctx, x, weight, target, group, chunk):
        start, end = _vocab_range(weight, group)
        n = x.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(loss)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            t = target[a:b]
            local = (t >= start) & (t < end)
            idx = (t - start).clamp(0, end - start - 1)
            part_lse, tgt = _local_stats_fused(x[a:b] @ weight.t(), idx, local)
            if group is not None:  # combine the ranks' slices: lse = m + log sum_r exp(lse_r - m)
                m = part_lse.clone()
                _all_reduce(m, group, dist.ReduceOp.MAX)
                both = torch.stack([(part_lse - m).exp(), tgt])
                _all_reduce(both, group)  # [sum of exp, target logit] in one collective
                part_lse, tgt = both[0].log() + m, both[1]
            lse[a:b] = part_lse
            loss[a:b] = part_lse - tgt
        ctx.save_for_backward(x, weight, target, lse)
        ctx.group, ctx.chunk = group, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, target, lse = ctx.saved_tensors
        start, end = _vocab_range(weight, ctx.group)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        n = x.shape[0]
        for a in range(0, n, ctx.chunk):
            b = min(a + ctx.chunk, n)
            t = target[a:b]
            local = (t >= start) & (t < end)
            idx = (t - start).clamp(0, end - start - 1)
            # logits recomputed (one extra matmul) instead of kept from the forward
            g = _grad_logits_fused(x[a:b] @ weight.t(), lse[a:b], idx, local,
                                   grad_loss[a:b].contiguous())
            grad_x[a:b] = g @ weight
            grad_w += (g.t() @ x[a:b]).float()
        return grad_x, grad_w.to(weight.dtype), None, None, None


def chunked_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                         labels: torch.Tensor, tp_group=None,
                                         sequence_parallel: bool = False,
                                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from decoder output hidden [s(/tp), b, h] and the output weight.

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
    loss = _ChunkedLinearCrossEntropy.apply(x, weight, target, tp_group if tp > 1 else None,
                                            chunk_tokens)
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
            sequence_parallel=bool(self.output_layer.sequence_parallel), chunk_tokens=chunk_tokens)

    model._postprocess = types.MethodType(_postprocess, model)
    return model


def chunk_tokens_for(vocab_per_rank: int, budget_bytes: int = 1 << 30) -> int:
    """Chunk size whose fp32 logits stay within budget_bytes (default 1 GiB), at least 256 tokens."""
    return max(256, budget_bytes // (4 * max(1, vocab_per_rank)))


__all__ = ["chunked_vocab_parallel_cross_entropy", "enable_chunked_cross_entropy",
           "chunk_tokens_for", "DEFAULT_CHUNK_TOKENS"]
