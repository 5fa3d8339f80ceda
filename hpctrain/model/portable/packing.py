"""Packed micro-batches in megatron's `thd` form for the portable attention.

The data contract gives packed rows [b, s] with position_ids restarting per sample and cu_seqlens
over the flattened b*s stream. megatron-core's RoPE ignores position_ids: it restarts positions per
sample only in the `thd` format (PackedSeqParams.qkv_format == 'thd', batch dim 1), where it slices
the rotary table per segment of cu_seqlens. So a packed batch goes to the model as one [1, b*s]
stream with PackedSeqParams(thd); the attention then masks by segment (attention.py).
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def to_thd(batch: dict) -> dict:
    """Flatten a packed batch [b, s] into one [1, b*s] stream (cu_seqlens already cover it)."""
    if batch.get("cu_seqlens") is None:
        raise ValueError("to_thd needs a packed batch (cu_seqlens); unpacked batches stay [b, s]")
    out = dict(batch)
    b, s = batch["input_ids"].shape
    for key, val in batch.items():
        if torch.is_tensor(val) and val.dim() == 2 and tuple(val.shape) == (b, s):
            out[key] = val.reshape(1, b * s)
    total = int(batch["cu_seqlens"][-1])
    if total != b * s:
        raise ValueError(f"cu_seqlens end at {total} but the batch holds {b}x{s}={b * s} tokens: "
                         "every token (padding included) must belong to a segment")
    return out


def packed_seq_params(cu_seqlens: torch.Tensor, cp_group=None, device=None) -> PackedSeqParams:
    """PackedSeqParams for a thd stream; cu_seqlens are GLOBAL (before any CP split), int32.

    Give the offsets as a CPU tensor and the model's ``device``: the longest sample is read on the
    host and the offsets copied without blocking (reading them back from a GPU would sync)."""
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if device is not None and torch.device(device) != cu.device:
        pinned = cu.pin_memory() if torch.device(device).type == "cuda" else cu
        cu = pinned.to(device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len, cp_group=cp_group)
