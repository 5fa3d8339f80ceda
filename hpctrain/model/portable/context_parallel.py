"""Context parallel without Transformer Engine.

Layout (the one megatron-core and TE use, so RoPE and the loss agree): a sequence of length S is cut
into 2*CP equal chunks and CP rank r keeps chunks r and 2*CP-1-r, which balances causal-attention
work across ranks (an early chunk is cheap, a late chunk expensive). With packed sequences in the
`thd` format every sample (segment of cu_seqlens) is cut the same way on its own, so each segment's
length must be a multiple of 2*CP (`pad_segments_for_cp` pads them).

Attention then all-gathers K and V over the CP group (`gather_kv`, gradients reduce-scattered in
backward) and masks by global position, see attention.py.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


def cp_chunk_index(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions (0..seq_len-1) that CP rank `cp_rank` keeps of one sequence, in local order."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2*context_parallel_size "
            f"(2*{cp_size}); pad it (data.max_length / packing_length) to a multiple of {2 * cp_size}"
        )
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def cp_token_index(
    cu_seqlens: Optional[Sequence[int]], total: int, cp_size: int, cp_rank: int, device=None
) -> torch.Tensor:
    """Indices into the global token stream that CP rank `cp_rank` holds, in local order.

    Without cu_seqlens the stream is one sequence; with cu_seqlens (thd) each segment is split alone.
    """
    if cu_seqlens is None:
        return cp_chunk_index(total, cp_size, cp_rank, device)
    bounds = [int(x) for x in cu_seqlens]
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to {total} tokens, got {bounds[0]}..{bounds[-1]}")
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            parts.append(start + cp_chunk_index(end - start, cp_size, cp_rank, device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def cp_gather_order(
    cu_seqlens: Optional[Sequence[int]], total: int, cp_size: int, device=None
) -> torch.Tensor:
    """Permutation that puts the rank-major gathered tokens back in global stream order.

    gathered[perm] == global stream, where gathered = cat(local tokens of rank 0, rank 1, ...).
    """
    held = torch.cat([cp_token_index(cu_seqlens, total, cp_size, r) for r in range(cp_size)])
    return torch.argsort(held).to(device)


class _GatherDim0(torch.autograd.Function):
    """All-gather along dim 0 (rank-major concat); backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_flat(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce-scatter: all-reduce then keep this rank's slice.
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        rank = dist.get_rank(group)
        return grad[rank * n:(rank + 1) * n].contiguous(), None


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def gather_kv(key: torch.Tensor, value: torch.Tensor, group, perm: torch.Tensor, seq_dim: int):
    """All-gather K and V (one collective) over the CP group and return them in global order."""
    kv = torch.stack([key, value]).movedim(seq_dim + 1, 0)  # [s_local, 2, ...]
    full = _GatherDim0.apply(kv, group)  # [cp * s_local, 2, ...], rank-major
    full = full.index_select(0, perm).movedim(0, seq_dim + 1)
    return full[0], full[1]


# ---------------------------------------------------------------- batch helpers for the trainer

def split_batch_for_cp(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """Keep this CP rank's tokens of a micro-batch (the data contract's dict).

    Unpacked: tensors [b, s] are split along s (s a multiple of 2*cp). Packed (cu_seqlens present):
    the batch must be in thd form ([1, T], see packing.to_thd) with every segment a multiple of 2*cp
    (see pad_segments_for_cp); cu_seqlens stay GLOBAL, as megatron's thd RoPE expects.
    num_loss_tokens becomes this rank's count: sum it over the CP group for the normaliser.
    """
    if cp_size == 1:
        return batch
    cu = batch.get("cu_seqlens")
    seq_len = batch["input_ids"].shape[1]
    if cu is not None and batch["input_ids"].shape[0] != 1:
        raise ValueError("packed batches must be in thd form ([1, T]) for context parallel: use to_thd()")
    idx = cp_token_index(cu.tolist() if cu is not None else None, seq_len, cp_size, cp_rank,
                         device=batch["input_ids"].device)
    out = dict(batch)
    for key, val in batch.items():
        if torch.is_tensor(val) and val.dim() >= 2 and val.shape[1] == seq_len and key != "cu_seqlens":
            out[key] = val.index_select(1, idx)
    if "labels" in out:
        out["num_loss_tokens"] = int((out["labels"] != IGNORE_INDEX).sum())
    return out


def pad_segments_for_cp(batch: dict, cp_size: int, pad_token_id: int = 0) -> dict:
    """Pad every segment of a thd batch to a multiple of 2*cp (pad tokens carry no loss).

    The pad goes at the END of each segment, so under causal masking real tokens never see it;
    position ids continue counting. Returns a new batch with new cu_seqlens.
    """
    cu = batch["cu_seqlens"].tolist()
    mult = 2 * cp_size
    pieces: dict = {k: [] for k in ("input_ids", "labels", "position_ids") if k in batch}
    new_cu = [0]
    for start, end in zip(cu[:-1], cu[1:]):
        n = end - start
        pad = (-n) % mult
        for key in pieces:
            seg = batch[key][:, start:end]
            if pad:
                if key == "input_ids":
                    fill = torch.full((1, pad), pad_token_id, dtype=seg.dtype, device=seg.device)
                elif key == "labels":
                    fill = torch.full((1, pad), IGNORE_INDEX, dtype=seg.dtype, device=seg.device)
                else:
                    last = seg[:, -1:] if n else torch.zeros((1, 1), dtype=seg.dtype, device=seg.device)
                    fill = last + torch.arange(1, pad + 1, dtype=seg.dtype, device=seg.device)
                seg = torch.cat([seg, fill], dim=1)
            pieces[key].append(seg)
        new_cu.append(new_cu[-1] + n + pad)
    out = dict(batch)
    for key, segs in pieces.items():
        out[key] = torch.cat(segs, dim=1)
    out["cu_seqlens"] = torch.tensor(new_cu, dtype=torch.int32, device=batch["cu_seqlens"].device)
    return out
