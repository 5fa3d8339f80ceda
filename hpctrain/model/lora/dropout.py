"""``dropout(x) @ A.T`` for the LoRA adapter, keeping nothing for the backward but ``x`` itself.

Why our own autograd function: ``F.linear(F.dropout(x), A)`` keeps the dropped copy of ``x`` (for A's
gradient) and the dropout mask (for x's gradient), 3 bytes per input element, while ``x`` itself is
kept anyway or recomputed (the base linear's input; megatron-core's ``layernorm`` and hpctrain's
``mlp_act`` recompute free it and refill it in place before the backward). On the Qwen2.5-7B shape
with all linears adapted, that copy was ~3.7 GiB of a 30.7 GiB peak at micro-batch 1 x 2048
(docs/benchmarks.md). Here the forward saves ``x`` (the same tensor, no copy) and the random
generator's state; the backward draws the same mask again from that state.

The numbers are those of dropout: ``x * mask / (1 - p)`` with ``mask ~ Bernoulli(1 - p)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _generator_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _mask(like: torch.Tensor, keep: float, state: torch.Tensor | None = None) -> torch.Tensor:
    """A Bernoulli(keep) mask shaped like ``like``: from the default generator (advancing it), or,
    given ``state``, from a private generator set to it (the same draws, the default one untouched)."""
    gen = None
    if state is not None:
        gen = torch.Generator(device=like.device)
        gen.set_state(state)
    return torch.empty_like(like).bernoulli_(keep, generator=gen)


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p: float):
        keep = 1.0 - p
        ctx.state = _generator_state(x.device)
        dropped = x * _mask(x, keep) * (1.0 / keep)
        ctx.save_for_backward(x, weight)
        ctx.keep = keep
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        scaled_mask = _mask(x, ctx.keep, ctx.state) * (1.0 / ctx.keep)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * scaled_mask
        if ctx.needs_input_grad[1]:
            dropped = (x * scaled_mask).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped
        return grad_x, grad_w, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)`` (no bias), lean on memory."""
    return _DropoutLinear.apply(x, weight, p)
