"""Norms for the portable spec that work with sequence parallel.

megatron-core's WrappedTorchNorm (its fallback without apex/TE) asserts that sequence parallel is
off. Nothing in the norm itself depends on it: under sequence parallel each TP rank normalises its
own slice of the sequence, so the weight gradients are partial sums that must be all-reduced over TP.
megatron-core's finalize_model_grads does that for every parameter tagged `sequence_parallel=True`,
so we tag the weights (and bias) here.
"""
from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class _RMSNormFunction(torch.autograd.Function):
    """HF's RMSNorm (normalise in fp32, cast to the input dtype, scale by the weight) keeping only
    the input and the per-token 1/rms for the backward.

    Autograd of the plain expression would keep an fp32 copy of the input and the normalised
    output besides (6 bytes per element more than needed in bf16: measured with
    tools/bench/act_memory.py, 6 of the ~65 s*b*h bytes a 7B layer kept per norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype) * weight.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        gw = (grad * xhat.to(x.dtype)).float()
        grad_weight = gw.reshape(-1, gw.shape[-1]).sum(0).to(weight.dtype)
        # d xhat = grad * w (in the output dtype, as the forward's product), then through the norm.
        dxhat = (grad * weight.to(grad.dtype)).float()
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with HF's casting; Liger's Triton kernel on CUDA when installed (same casting,
    "llama" mode; one kernel each way instead of ~8), else the autograd function above."""
    if x.is_cuda and _liger_rms_norm() is not None:
        shape = x.shape
        out = _liger_rms_norm().apply(x.reshape(-1, shape[-1]), weight, eps, 0.0, "llama", False)
        return out.view(shape)
    return _RMSNormFunction.apply(x, weight, eps)


_LIGER: dict = {}


def _liger_rms_norm():
    if "rms" not in _LIGER:
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        except ImportError:
            LigerRMSNormFunction = None
        _LIGER["rms"] = LigerRMSNormFunction
    return _LIGER["rms"]


class PortableRMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back (as HF Qwen2/Llama do), then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class PortableNorm:
    """Factory with WrappedTorchNorm's signature: RMSNorm or LayerNorm, SP-tagged weights."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise NotImplementedError("portable spec: layernorm_zero_centered_gamma is not supported")
        sp = bool(config.sequence_parallel)
        if config.normalization == "RMSNorm":
            norm = PortableRMSNorm(hidden_size, eps=eps, sequence_parallel=sp)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
            for p in norm.parameters():
                p.sequence_parallel = sp
        else:
            raise ValueError(f"portable spec: normalization {config.normalization!r} is not supported "
                             "(use 'RMSNorm' or 'LayerNorm')")
        dtype = config.params_dtype
        return norm.to(dtype=dtype) if dtype is not None else norm
