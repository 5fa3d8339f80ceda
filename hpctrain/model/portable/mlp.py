"""The dense MLP of the portable spec: megatron-core's MLP with a lean SwiGLU.

Same parameters, checkpoint keys and numbers as megatron-core's ``MLP``; two differences, both about
what the backward keeps (measured with tools/bench/act_memory.py on the Qwen2.5-7B shape, in units
of s*b*h bytes per layer):

* the SwiGLU keeps only its input (the fc1 output, 21.1 units) on every device. megatron-core's
  unfused path (no ``bias_activation_fusion``: CPU, or fusions off) keeps the SiLU output and a copy
  of the up half besides (21.1 units more); on CUDA megatron's own fused ``bias_swiglu_impl`` is
  used, which keeps the same as ours;
* ``recompute_act=True`` (``recompute_modules`` entry ``mlp_act``) does not keep the SwiGLU output
  that fc2 needs for its weight gradient (10.6 units): it is freed after fc2's forward and
  recomputed from the fc1 output just before fc2's backward (megatron-core's
  ``CheckpointWithoutOutput``, the mechanism behind its ``moe_act`` recompute), at the cost of one
  elementwise kernel per layer.

Anything else (biases, GeLU, per-token scales, TE activations) goes through megatron-core's MLP.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of x = [gate; up] (last dim), keeping only x for the backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * up * sig * (1 + gate * (1 - sig))
        return torch.cat((d_gate, grad * silu), dim=-1)


def swiglu(x: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused and x.is_cuda:
        from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

        return bias_swiglu_impl(x, None)
    return _SwiGLU.apply(x)


class _QuietUnknownMLP(logging.Filter):
    """megatron-core's TransformerLayer warns "Unknown MLP type" for any MLP class other than its own
    (it only decides which process-group keyword to pass; PortableMLP then takes the TP group from
    parallel_state, as MLP does without one). One warning per layer would only be noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietUnknownMLP())


class PortableMLP(MLP):
    """megatron-core's MLP; the bias-free SwiGLU case runs the lean path described above."""

    def __init__(self, config, submodules, is_expert: bool = False, input_size=None,
                 ffn_hidden_size=None, tp_group=None, recompute_act: bool = False):
        super().__init__(config, submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size, tp_group=tp_group)
        self.recompute_act = recompute_act
        c = self.config
        self._lean = (c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
                      and not c.use_te_activation_func and c.activation_func_clamp_value is None
                      and not c.glu_linear_offset)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._lean or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1_out, _ = self.linear_fc1(hidden_states)
        fused = self.config.bias_activation_fusion
        if self.recompute_act and self.training and torch.is_grad_enabled():
            from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

            ckpt = CheckpointWithoutOutput()
            act = ckpt.checkpoint(lambda x: swiglu(x, fused), fc1_out)
            out, out_bias = self.linear_fc2(act)
            ckpt.discard_output_and_register_recompute(out)
            return out, out_bias
        return self.linear_fc2(swiglu(fc1_out, fused))
