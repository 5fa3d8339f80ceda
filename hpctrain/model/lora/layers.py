"""The LoRA adapter on megatron-core's ColumnParallelLinear and RowParallelLinear.

``y = base(x) + B(A(dropout(x))) * scaling`` (PEFT's LoRA), sharded like the base weight so that no
rank ever holds more than its share of the big side:

* column-parallel (linear_qkv, linear_fc1; weight [out/tp, in]): A [r, in] is whole on every TP rank,
  B [out/tp, r] is split like the weight's rows. A runs on the rank's input; its [.., r] output is
  made whole before B: without sequence parallel the input is already whole (copy to the TP region:
  the backward all-reduces dL/d(Ax) over TP, so A's gradient is complete on every rank); with
  sequence parallel the input is this rank's sequence chunk (all-gather the r-wide result; A's
  gradient is then a partial sum over the chunks, and A is tagged ``sequence_parallel`` so that
  megatron-core's finalize_model_grads all-reduces it over TP, as it does for the norms).
* row-parallel (linear_proj, linear_fc2; weight [out, in/tp]): A [r, in/tp] is split like the weight's
  columns, B [out, r] is whole. The partial A outputs are summed over TP (all-reduce), or, with
  sequence parallel, reduce-scattered to this rank's sequence chunk, where B (tagged
  ``sequence_parallel``) runs; both match what the base output does.

Context parallel and data parallel need nothing here (per-token maths; DDP reduces the grads).
The r-wide exchanges are ``rank / hidden`` of the base layer's. Checkpoint keys: ``<linear>.lora_A``
and ``<linear>.lora_B`` beside the base ``weight``; the fused gate/up B is saved in the global
[gate; up] row order (megatron-core's swiglu factory, as for linear_fc1.weight), so checkpoints
load at any TP.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as tpl
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from hpctrain.model.lora.dropout import dropout_linear


class _LoraMixin:
    """Mixed into the base linear's class (``as_lora``): its parameters, forward and checkpoint keys."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter

    def _lora_init(self, rank: int, scaling: float, dropout: float, gated: bool) -> None:
        column = isinstance(self, ColumnParallelLinear)
        w = self.weight
        rows, cols = w.shape  # this rank's shard of the base weight
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, cols, dtype=w.dtype, device=w.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(rows, rank, dtype=w.dtype, device=w.device))
        split = self.lora_B if column else self.lora_A
        tpl.set_tensor_model_parallel_attributes(split, True, 0 if column else 1, 1)
        whole = self.lora_A if column else self.lora_B
        self._lora_sp = bool(self.config.sequence_parallel) and self.tp_group.size() > 1
        if self._lora_sp:
            whole.sequence_parallel = True  # its grad is a sum over sequence chunks: all-reduced over TP
        self.lora_scaling, self.lora_dropout_p, self._lora_gated = scaling, dropout, gated and column

    def _lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """A(dropout(x)); the dropout keeps no copy of x (dropout.py)."""
        if not self.lora_dropout_p or not self.training:
            return F.linear(x, self.lora_A)
        # Each TP rank sees different values when its input is split (row-parallel, or any input
        # under SP): draw from megatron's per-TP-rank stream then; a whole input, from the shared one.
        if isinstance(self, RowParallelLinear) or self._lora_sp:
            with tpl.get_cuda_rng_tracker().fork():
                return dropout_linear(x, self.lora_A, self.lora_dropout_p)
        return dropout_linear(x, self.lora_A, self.lora_dropout_p)

    def _lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self._lora_down(x)
        g = self.tp_group
        if isinstance(self, ColumnParallelLinear):
            if self._lora_sp:
                h = tpl.gather_from_sequence_parallel_region(h, group=g)
            elif g.size() > 1:
                h = tpl.copy_to_tensor_model_parallel_region(h, group=g)
        elif self._lora_sp:
            h = tpl.reduce_scatter_to_sequence_parallel_region(h, group=g)
        elif g.size() > 1:
            h = tpl.reduce_from_tensor_model_parallel_region(h, group=g)
        return F.linear(h, self.lora_B) * self.lora_scaling

    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron-core's frozen-weight linear returns no bias gradient: with lora_bias = all (a trained
        # bias on a frozen weight) the bias is added here, where autograd sees it.
        bias = kwargs.get("bias")
        if bias is not None and bias.requires_grad and not weight.requires_grad:
            kwargs["bias"] = None
            return super()._forward_impl(input, weight, *args, **kwargs) + bias
        return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return out + self._lora_delta(x).to(out.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        column = isinstance(self, ColumnParallelLinear)
        axes = {"weight": 0, "bias": 0, "lora_B": 0} if column else {"weight": 1, "lora_A": 1}
        sd = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                 sharded_offsets, tp_group=self.tp_group,
                                                 dp_cp_group=(metadata or {})["dp_cp_group"])
        if self._lora_gated:  # [gate_r; up_r] on each rank -> the global [gate; up] rows
            key = f"{prefix}lora_B"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        return sd


@functools.cache
def _lora_class(base: type) -> type:
    return type(f"Lora{base.__name__}", (_LoraMixin, base), {})


def as_lora(module, rank: int, scaling: float, dropout: float, gated: bool = False):
    """Turn ``module`` (a ColumnParallelLinear / RowParallelLinear, or a subclass) into its LoRA
    version in place: the module keeps its weights, name and checkpoint keys; ``gated``: the output
    rows are [gate; up] (linear_fc1 of a SwiGLU MLP)."""
    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        raise TypeError(f"LoRA wraps megatron-core's ColumnParallelLinear / RowParallelLinear, not "
                        f"{type(module).__name__}")
    module.__class__ = _lora_class(type(module))
    module._lora_init(rank, scaling, dropout, gated)
    return module


def is_lora(module) -> bool:
    return isinstance(module, _LoraMixin)
