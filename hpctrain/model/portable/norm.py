"""Norms for the portable spec that work with sequence parallel.

megatron-core's WrappedTorchNorm (its fallback without apex/TE) asserts that sequence parallel is
off. Nothing in the norm itself depends on it: under sequence parallel each TP rank normalises its
own slice of the sequence, so the weight gradients are partial sums that must be all-reduced over TP.
megatron-core's finalize_model_grads does that for every parameter tagged `sequence_parallel=True`,
so we tag the weights (and bias) here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig


class PortableRMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back (as HF Qwen2/Llama do), then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)

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
