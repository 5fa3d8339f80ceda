"""MoE experts without Transformer Engine or the grouped_gemm package: a grouped GEMM over all local
experts with PyTorch's grouped matmul.

megatron-core 0.16.1 offers three expert modules: ``SequentialMLP`` (one MLP per expert, run in a
Python loop: what ``moe_grouped_gemm = false`` selects), ``TEGroupedMLP`` (needs TE) and the legacy
``GroupedMLP`` (needs the ``grouped_gemm`` CUDA package, and bf16). ``PortableGroupedMLP`` is the
legacy GroupedMLP — same parameters (``weight1`` [hidden, experts * 2 * ffn], ``weight2``
[experts * ffn, hidden]), same checkpoint keys (its sharded_state_dict maps them onto
SequentialMLP's per-expert ``experts.linear_fc1/fc2`` tensors, so either module loads the other's
checkpoints) — whose two GEMMs run through ``torch.nn.functional.grouped_mm`` (torch >= 2.10, or
``torch._grouped_mm``): one kernel per GEMM for all experts on Hopper/Ampere in bf16, and on the CPU
in fp32 (torch 2.13 has a CPU kernel). Where the grouped kernel cannot take the operands (fp32 on
CUDA, rows whose stride is not a multiple of 16 bytes) each expert's rows are multiplied in a loop,
which gives the same numbers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import experts as mcore_experts
from megatron.core.transformer.moe import grouped_gemm_util


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm's backward rejects the
    stride-0 gradients an expanded ``sum()`` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_kernel():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_kernel_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether PyTorch's grouped matmul runs on these operands: bf16 on CUDA, fp32/bf16 on the CPU,
    every row stride a multiple of 16 bytes (the kernel's alignment rule)."""
    if _grouped_kernel() is None:
        return False
    if x.is_cuda and not (x.dtype == w.dtype == torch.bfloat16):
        return False
    if not x.is_cuda and x.dtype != torch.float32:
        return False
    size = x.element_size()
    return (x.shape[-1] * size) % 16 == 0 and (w.shape[-1] * size) % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` in groups of ``counts`` (one per expert) times ``w[e]`` ([experts, k, n])."""
    if offs is not None and grouped_kernel_takes(x, w):
        return _ContiguousGrad.apply(_grouped_kernel()(x, w, offs=offs))
    parts = torch.split(x, counts)
    return torch.cat([p @ w[e] for e, p in enumerate(parts)], dim=0)


@contextlib.contextmanager
def _without_grouped_gemm_check():
    """GroupedMLP.__init__ asserts the grouped_gemm package; this module never calls it."""
    saved = grouped_gemm_util.assert_grouped_gemm_is_available
    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        grouped_gemm_util.assert_grouped_gemm_is_available = saved


def _swiglu_with_probs(fc1: torch.Tensor, probs: torch.Tensor, fused: bool) -> torch.Tensor:
    """silu(gate) * up * router prob, in the activations' dtype: what SequentialMLP's experts compute
    (GroupedMLP's own version is a torch.compile'd closure, which would compile on the CPU too)."""
    from hpctrain.model.portable.mlp import swiglu

    return (swiglu(fc1, fused) * probs).to(fc1.dtype)


class PortableGroupedMLP(mcore_experts.GroupedMLP):
    """megatron-core's legacy GroupedMLP (parameters, init, checkpoint layout) with PyTorch's grouped
    matmul in place of the grouped_gemm package, in any dtype. SwiGLU experts only (Qwen3-MoE's);
    the spec refuses other activations."""

    def __init__(self, num_local_experts, config, submodules=None, pg_collection=None):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        with _without_grouped_gemm_check():
            super().__init__(num_local_experts, config, pg_collection=pg_collection)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # top-1 only (megatron-core checks it)
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        n = self.num_local_experts
        w1 = self.weight1.view(n, self.config.hidden_size, -1)
        w2 = self.weight2.view(n, -1, self.config.hidden_size)
        counts = [int(c) for c in tokens_per_expert.tolist()]
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(x.device)
        fc1 = grouped_mm(x, w1, counts, offs)
        fused = self.config.bias_activation_fusion

        def act(h, p):
            return _swiglu_with_probs(h, p, fused)

        if self.activation_recompute and self.training and torch.is_grad_enabled():
            from megatron.core.tensor_parallel import CheckpointWithoutOutput

            ckpt = CheckpointWithoutOutput()
            out = grouped_mm(ckpt.checkpoint(act, fc1, probs.unsqueeze(-1)), w2, counts, offs)
            ckpt.discard_output_and_register_recompute(out)
        else:
            out = grouped_mm(act(fc1, probs.unsqueeze(-1)), w2, counts, offs)
        if x.shape[0] == 0:  # no tokens here: keep the weights in the graph so their grads exist (zeros)
            out = out + 0.0 * (w1.sum() + w2.sum())
        return out, None
