"""Pure-Python (numpy) twins of the hpctrain._C kernels: the readable specification.

Each function has the same semantics as its native counterpart, and the tests hold the two
equal on random inputs. Inputs arrive already validated by the public wrappers (hpctrain.native).
"""
from __future__ import annotations

import bisect

import numpy as np


# --- packing ------------------------------------------------------------------------------
def pack_sequences(lengths: np.ndarray, capacity: int, *, truncate: bool = False):
    """Best-fit-decreasing; see hpctrain.native.packing.pack_sequences for the rule."""
    _check_lengths(lengths, capacity, truncate)
    eff = np.minimum(lengths.astype(np.int64), capacity)
    visit = np.argsort(-eff, kind="stable")          # longest first, index ascending on ties
    stacks: dict[int, list[int]] = {}                # remaining capacity -> bins (LIFO)
    classes: list[int] = []                          # sorted remaining capacities with bins
    remaining: list[int] = []
    placed = np.empty(len(eff), dtype=np.int64)
    for k, i in enumerate(visit):
        length = int(eff[i])
        j = bisect.bisect_left(classes, length)      # smallest remaining capacity >= length
        if j == len(classes):
            b = len(remaining)
            remaining.append(capacity - length)
        else:
            r = classes[j]
            b = stacks[r].pop()
            if not stacks[r]:
                del stacks[r]
                classes.pop(j)
            remaining[b] = r - length
        r = remaining[b]
        if r not in stacks:
            stacks[r] = []
            bisect.insort(classes, r)
        stacks[r].append(b)
        placed[k] = b
    by_bin = np.argsort(placed, kind="stable")       # group by bin, keep placement order
    order = visit[by_bin].astype(np.int64)
    bin_offsets = np.zeros(len(remaining) + 1, dtype=np.int64)
    np.cumsum(np.bincount(placed, minlength=len(remaining)), out=bin_offsets[1:])
    return bin_offsets, order


def _check_lengths(lengths, capacity, truncate):
    if len(lengths) and lengths.min() < 0:
        i = int(np.argmin(lengths))
        raise ValueError(f"lengths[{i}] = {lengths[i]} is negative; sample lengths must be >= 0")
    too_long = lengths > capacity
    if too_long.any() and not truncate:
        i = int(np.argmax(lengths))
        raise ValueError(f"{int(too_long.sum())} sample(s) are longer than the capacity {capacity} "
                         f"(longest: lengths[{i}] = {lengths[i]}); raise the capacity "
                         "(max_length / packing_length) or pass truncate=True")


# --- packed batch index -------------------------------------------------------------------
def packed_batch_index(lengths: np.ndarray, row_offsets: np.ndarray, seq_len: int):
    """position_ids [b, seq_len] and cu_seqlens (int32) for packed rows; padding is a segment."""
    rows = len(row_offsets) - 1
    positions = np.zeros((rows, seq_len), dtype=np.int64)
    cu = [0]
    for r in range(rows):
        samples = [int(n) for n in lengths[row_offsets[r]:row_offsets[r + 1]]]
        if any(n < 0 for n in samples):
            raise ValueError(f"row {r} has a negative sample length")
        if sum(samples) > seq_len:
            raise ValueError(f"row {r} holds {sum(samples)} tokens, more than seq_len = {seq_len}")
        pad = seq_len - sum(samples)
        t = 0
        for n in samples + ([pad] if pad else []):
            if n == 0:
                continue
            positions[r, t:t + n] = np.arange(n)
            t += n
            cu.append(r * seq_len + t)
    return positions, np.asarray(cu, dtype=np.int32)


# --- pretraining sample index -------------------------------------------------------------
def pt_sample_index(doc_lengths: np.ndarray, doc_order: np.ndarray, seq_length: int, num_samples: int):
    """Windows of seq_length+1 tokens over the stream; see hpctrain.native.pt_index."""
    if len(doc_lengths) and doc_lengths.min() < 0:
        raise ValueError("doc_lengths must be >= 0")
    if len(doc_order) and (doc_order.min() < 0 or doc_order.max() >= len(doc_lengths)):
        raise ValueError(f"doc_order holds values outside [0, {len(doc_lengths)})")
    lens = doc_lengths[doc_order].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])   # stream offset of every doc_order entry
    total = int(starts[-1])
    possible = (total - 1) // seq_length if total > 0 else 0
    num_samples = possible if num_samples < 0 else num_samples
    if num_samples > possible:
        raise ValueError(f"num_samples = {num_samples} needs more tokens than the documents hold ({total})")
    if total == 0:
        return np.zeros((1, 2), np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32)
    window_starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # a token belongs to the non-empty document whose range contains it: skip empty ones
    k = np.searchsorted(starts[1:], window_starts, side="right")  # first doc ending after it
    sample_idx = np.stack([k, window_starts - starts[k]], axis=1).astype(np.int64)
    doc_begins = starts[:-1][lens > 0]               # where each non-empty document starts
    lo = np.searchsorted(doc_begins, window_starts[:-1], side="right")     # begins > start
    hi = np.searchsorted(doc_begins, window_starts[:-1] + seq_length, side="right")  # <= start+S
    boundary_offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
    boundaries = np.concatenate(
        [doc_begins[a:b] - s for a, b, s in zip(lo, hi, window_starts[:-1])] or [np.zeros(0)]
    ).astype(np.int32)
    return sample_idx, boundary_offsets, boundaries


# --- re-layout ----------------------------------------------------------------------------
def copy_views(pairs) -> int:
    """dst[...] = src[...] for every (dst, src) pair; returns bytes copied."""
    total = 0
    for dst, src in pairs:
        np.copyto(dst, src.view(dst.dtype) if src.dtype != dst.dtype else src, casting="no")
        total += dst.nbytes
    return total


def qkv_to_mcore(q, k, v, num_query_groups: int, heads_per_group: int, head_dim: int, tp: int, rank: int):
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron fused QKV rows of TP rank `rank`:
    for each query group g held by the rank: [q heads of g (hpg*d rows), k_g (d), v_g (d)]."""
    rest = q.shape[1:]
    qg = q.reshape(num_query_groups, heads_per_group * head_dim, *rest)
    kg = k.reshape(num_query_groups, head_dim, *rest)
    vg = v.reshape(num_query_groups, head_dim, *rest)
    fused = np.concatenate([qg, kg, vg], axis=1)      # [ng, (hpg+2)*d, ...]
    per_rank = num_query_groups // tp
    shard = fused[rank * per_rank:(rank + 1) * per_rank]
    return shard.reshape(per_rank * (heads_per_group + 2) * head_dim, *rest)


def qkv_from_mcore(shards, num_query_groups: int, heads_per_group: int, head_dim: int):
    """All TP shards of a fused QKV (rank order) -> HF (q, k, v)."""
    fused = np.concatenate(list(shards), axis=0)
    rest = fused.shape[1:]
    g = fused.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    qn = heads_per_group * head_dim
    q = g[:, :qn].reshape(num_query_groups * qn, *rest)
    k = g[:, qn:qn + head_dim].reshape(num_query_groups * head_dim, *rest)
    v = g[:, qn + head_dim:].reshape(num_query_groups * head_dim, *rest)
    return q, k, v


def gated_mlp_to_mcore(gate, up, tp: int, rank: int):
    """HF gate/up [ffn, ...] -> megatron linear_fc1 of TP rank r: [gate_shard_r; up_shard_r]."""
    n = gate.shape[0] // tp
    return np.concatenate([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]], axis=0)


def gated_mlp_from_mcore(shards):
    """All TP shards of linear_fc1 (rank order) -> HF (gate, up)."""
    halves = [np.split(s, 2, axis=0) for s in shards]
    return np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves])
