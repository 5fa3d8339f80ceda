"""megatron-core's SelfAttention, without the core-attention recompute where it buys nothing.

``recompute_granularity = "selective"`` with ``core_attn`` recomputes the attention in the backward
because megatron's unfused attention keeps the s x s scores and probabilities. The kernels the
portable attention runs on CUDA (SDPA flash / cuDNN / memory-efficient, flex_attention) keep only
q, k, v, the output and a log-sum-exp per row: the recompute would keep q, k, v (its inputs) instead
of the same set and then run the attention forward a second time. So on CUDA it is skipped (logged
once); on the CPU (SDPA's math kernel keeps the scores) it runs as asked.
"""
from __future__ import annotations

import logging

from megatron.core.transformer.attention import SelfAttention

log = logging.getLogger(__name__)
_SAID: set = set()


class PortableSelfAttention(SelfAttention):
    """SelfAttention whose core-attention checkpointing follows the kernel actually used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._asked_core_attn_recompute = self.checkpoint_core_attention

    def forward(self, hidden_states, *args, **kwargs):
        if self._asked_core_attn_recompute:
            self.checkpoint_core_attention = not hidden_states.is_cuda
            if hidden_states.is_cuda and "core_attn" not in _SAID:
                _SAID.add("core_attn")
                log.info("recompute_modules core_attn: not recomputed on CUDA - the portable attention's "
                         "flash/flex kernels keep O(s) activations, the same as the recompute would")
        return super().forward(hidden_states, *args, **kwargs)
