"""Core attention for megatron-core without Transformer Engine, through PyTorch's fused kernels.

`PortableAttention` has the interface of megatron.core.transformer.dot_product_attention
.DotProductAttention (so SelfAttention builds it from a ModuleSpec) but:
  * runs torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / memory-efficient on GPU)
    with is_causal, and grouped-query attention through enable_gqa=True (K/V are never repeated);
  * accepts packed sequences (PackedSeqParams, qkv_format 'thd' or 'sbhd' + cu_seqlens): samples in
    a bin never attend to each other. Kernel choice by device:
      - CUDA: flex_attention (torch.compile'd) with a document-causal BlockMask, which skips fully
        masked 128x128 blocks (measured 0.64 ms vs 1.46 ms for varlen_attn on H100, FACTS.md);
      - CPU, or when dropout is on: SDPA with an explicit boolean block-diagonal causal mask
        (flex_attention has no CPU backward; varlen_attn is CUDA-only);
  * supports context parallel (see context_parallel.py): K/V all-gathered over the CP group,
    causal masking by global position.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from hpctrain.model.portable.context_parallel import cp_gather_order, cp_token_index, gather_kv

try:  # torch >= 2.5
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover
    causal_lower_right = None

BACKENDS = ("auto", "sdpa", "flex")


# ------------------------------------------------------------------ masking plan (cached per batch)

class _Plan:
    """Where each local query and each (gathered, global-order) key sits: built once per micro-batch."""

    def __init__(self, cu_seqlens: Optional[list], total: int, local: int, cp_size: int,
                 cp_rank: int, device):
        # Built on the host and copied with non-blocking (pinned) copies: a tensor made on a GPU
        # from a Python list is a blocking copy that waits for all queued GPU work, which would
        # stall the host once per micro-batch.
        self.total = total
        self.q_index = _h2d(cp_token_index(cu_seqlens, total, cp_size, cp_rank)
                            if cp_size > 1 else torch.arange(local), device)
        self.perm = _h2d(cp_gather_order(cu_seqlens, total, cp_size), device) if cp_size > 1 else None
        if cu_seqlens is not None:
            bounds = torch.tensor(cu_seqlens)
            self.doc = _h2d(torch.bucketize(torch.arange(total), bounds[1:], right=True), device)
            self.starts = _h2d(bounds[:-1], device)
        else:
            self.doc = self.starts = None
        self._positions = None
        c = total // (2 * cp_size)
        self.half_starts = [cp_rank * c, (2 * cp_size - 1 - cp_rank) * c]  # unpacked CP only
        self._dense = None
        self._block = {}
        self.cache: dict = {}  # per-micro-batch tables other modules derive (rope.py)

    def positions(self) -> Tensor:
        """Position of each local token inside its own sample (for RoPE, see rope.py)."""
        if self._positions is None:
            if self.doc is None:
                self._positions = self.q_index
            else:
                self._positions = self.q_index - self.starts[self.doc[self.q_index]]
        return self._positions

    def dense_mask(self) -> Tensor:
        """Boolean [local, total] mask, True = attend (SDPA convention)."""
        if self._dense is None:
            kv = torch.arange(self.total, device=self.q_index.device)
            mask = kv[None, :] <= self.q_index[:, None]
            if self.doc is not None:
                mask &= self.doc[None, :] == self.doc[self.q_index][:, None]
            self._dense = mask
        return self._dense

    def block_mask(self, device):
        """flex_attention BlockMask for the same mask (document-causal by global position)."""
        key = str(device)
        if key not in self._block:
            doc = self.doc if self.doc is not None else torch.zeros(
                self.total, dtype=torch.long, device=self.q_index.device)
            self._block[key] = _document_causal_block_mask(self.q_index, doc, self.total, device)
        return self._block[key]


def _document_causal_block_mask(q_index: Tensor, doc: Tensor, total: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        qg = q_index[q_idx]
        return (kv_idx <= qg) & (doc[kv_idx] == doc[qg])

    kwargs = {}
    if "_compile" in inspect.signature(create_block_mask).parameters and device.type == "cuda":
        kwargs["_compile"] = True
    return create_block_mask(mask_mod, None, None, q_index.numel(), total, device=device, **kwargs)


class StaticPlan(_Plan):
    """A packed stream's plan whose tensors keep their addresses, for CUDA-graph replay
    (train/cuda_graph.py): ``update`` refills the sample ids, positions and the flex BlockMask in
    place before each replay. Registered under a fixed offsets tensor ``key`` that the model's
    PackedSeqParams carries, so every layer of the captured forward finds it."""

    def __init__(self, total: int, device):
        self.total, self.perm, self.starts, self._dense = total, None, None, None
        self.q_index = torch.arange(total, device=device)
        self.doc = torch.zeros(total, dtype=torch.long, device=device)
        self._positions = torch.zeros(total, dtype=torch.long, device=device)
        self.half_starts = [0, 0]
        self._block = {}
        self.cache = {}
        self.key = torch.tensor([0, total], dtype=torch.int32, device=device)
        _STATIC_PLANS[(self.key.data_ptr(), total, str(self.key.device))] = self

    def positions(self) -> Tensor:
        return self._positions

    def update(self, doc: Tensor, positions: Tensor) -> None:
        """New sample ids / in-sample positions (host tensors of ``total`` tokens). The BlockMask is
        rebuilt here, outside any capture, and copied into the one the captured kernels read."""
        device = self.doc.device
        self.doc.copy_(_h2d(doc.long(), device), non_blocking=True)
        self._positions.copy_(_h2d(positions.long(), device), non_blocking=True)
        fresh = _document_causal_block_mask(self.q_index, self.doc, self.total, device)
        static = self._block.setdefault(str(device), fresh)
        if static is not fresh:
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                         "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
                dst, src = getattr(static, name, None), getattr(fresh, name, None)
                if dst is not None and src is not None:
                    dst.copy_(src)


_STATIC_PLANS: dict = {}


def _h2d(t: Tensor, device) -> Tensor:
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_PLAN_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _get_plan(cu_seqlens: Optional[Tensor], total: int, local: int, cp_size: int, cp_rank: int,
              device, host_cu_seqlens: Optional[list] = None) -> _Plan:
    """One plan per (micro-batch, rank): every layer (and recompute) of a forward reuses it.

    ``host_cu_seqlens`` (the same offsets as a list) spares reading a device tensor back: the
    trainer builds the plan before the forward with it (train/step.py), so no layer syncs."""
    if cu_seqlens is not None and cp_size == 1:
        static = _STATIC_PLANS.get((cu_seqlens.data_ptr(), total, str(cu_seqlens.device)))
        if static is not None:
            return static
    key = (None if cu_seqlens is None else (cu_seqlens.data_ptr(), cu_seqlens._version),
           total, local, cp_size, cp_rank, str(device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit[1]
    cu = host_cu_seqlens
    if cu is None and cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens.tolist()]
    plan = _Plan(cu, total, local, cp_size, cp_rank, device)
    # Keep a reference to cu_seqlens so its storage (and data_ptr) is not reused while cached.
    # Several entries: a recompute in the backward (full recompute, pipeline schedules) comes back
    # to a micro-batch after later ones were planned.
    _PLAN_CACHE[key] = (cu_seqlens, plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


# ------------------------------------------------------------------ kernels on [b, h, s, d]

_FLEX = {}


def _flex_attention():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
            else flex_attention
    return _FLEX["fn"]


def _sdpa(q, k, v, scale, dropout_p, gqa, mask=None, is_causal=False):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=gqa)


def _masked(q, k, v, plan: _Plan, scale, dropout_p, gqa, backend):
    use_flex = backend == "flex" or (backend == "auto" and q.is_cuda and dropout_p == 0.0)
    if use_flex:
        return _flex_attention()(q, k, v, block_mask=plan.block_mask(q.device), scale=scale,
                                 enable_gqa=gqa)
    return _sdpa(q, k, v, scale, dropout_p, gqa, mask=plan.dense_mask())


def _cp_causal(q, k, v, plan: _Plan, scale, dropout_p, gqa):
    """Unpacked context parallel: each local half attends a prefix of the global K/V (lower-right)."""
    half = q.shape[2] // 2
    starts = plan.half_starts  # global position of each half's first token
    outs = []
    for part, start in zip((q[:, :, :half], q[:, :, half:]), starts):
        end = start + half  # keys 0..end-1 are visible; the last `half` of them causally
        if causal_lower_right is None:  # pragma: no cover
            mask = torch.ones(half, end, dtype=torch.bool, device=q.device).tril(end - half)
        else:
            mask = causal_lower_right(half, end)
        outs.append(_sdpa(part, k[:, :, :end], v[:, :, :end], scale, dropout_p, gqa, mask=mask))
    return torch.cat(outs, dim=2)


def _gather_bhsd(k, v, cp_group, perm):
    """All-gather [b, h, s_local, d] K/V over CP and return [b, h, s_global, d] in global order."""
    k_local, v_local = (x.permute(2, 0, 1, 3) for x in (k, v))  # [s, b, h, d]
    k_full, v_full = gather_kv(k_local, v_local, cp_group, perm, seq_dim=0)
    return tuple(x.permute(1, 2, 0, 3) for x in (k_full, v_full))


# ------------------------------------------------------------------ public functional API

def portable_attention(query: Tensor, key: Tensor, value: Tensor, *, scale: Optional[float] = None,
                       dropout_p: float = 0.0, qkv_format: str = "sbhd",
                       cu_seqlens: Optional[Tensor] = None, cp_group=None,
                       attention_mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Causal attention in megatron layouts.

    query [s, b, hq, d] (sbhd) or [t, hq, d] (thd); key/value with hkv heads (hq % hkv == 0).
    cu_seqlens (int32, GLOBAL token offsets, thd or flattened sbhd stream) marks packed samples.
    attention_mask (megatron convention, True = masked out) replaces the causal mask when given
    (unpacked, no CP only). Returns the query's layout: [s, b, hq, d] or [t, hq, d].
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    cp_size = cp_group.size() if cp_group is not None else 1
    cp_rank = cp_group.rank() if cp_size > 1 else 0
    gqa = query.shape[-2] != key.shape[-2]
    if qkv_format == "sbhd" and cu_seqlens is not None:
        if cp_size > 1:
            raise NotImplementedError("packed sequences with context parallel need qkv_format='thd'")
        s, b = query.shape[:2]
        flat = [x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (query, key, value)]
        out = portable_attention(*flat, scale=scale, dropout_p=dropout_p, qkv_format="thd",
                                 cu_seqlens=cu_seqlens, backend=backend)
        return out.view(b, s, *out.shape[1:]).transpose(0, 1).contiguous()
    if qkv_format == "thd":
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
    elif qkv_format == "sbhd":
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
    else:
        raise ValueError(f"qkv_format {qkv_format!r} is not supported (use 'sbhd' or 'thd')")
    if attention_mask is not None and cu_seqlens is None:
        if cp_size > 1:
            raise NotImplementedError("an explicit attention_mask is not supported with context parallel")
        out = _sdpa(q, k, v, scale, dropout_p, gqa, mask=~attention_mask.bool())
    elif cu_seqlens is None and cp_size == 1:
        out = _sdpa(q, k, v, scale, dropout_p, gqa, is_causal=True)
    else:
        plan = _get_plan(cu_seqlens, q.shape[2] * cp_size, q.shape[2], cp_size, cp_rank, q.device)
        if cp_size > 1:
            k, v = _gather_bhsd(k, v, cp_group, plan.perm)
        if cu_seqlens is None and backend != "flex":
            out = _cp_causal(q, k, v, plan, scale, dropout_p, gqa)
        else:
            out = _masked(q, k, v, plan, scale, dropout_p, gqa, backend)
    if qkv_format == "thd":
        return out.squeeze(0).permute(1, 0, 2).contiguous()
    return out.permute(2, 0, 1, 3).contiguous()


# ------------------------------------------------------------------ the megatron-core module

class PortableAttention(MegatronModule):
    """Drop-in core_attention for SelfAttention (see module docstring)."""

    backend = "auto"  # class-level switch for benchmarks/tests: "auto" | "sdpa" | "flex"

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        from hpctrain.model.portable import rope

        rope.install()  # sync-free packed (thd) RoPE for the layers around this attention
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("PortableAttention: sliding-window attention (window_size) "
                                      "is not supported; unset window_size or use transformer_impl='te'")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"PortableAttention: softmax_type={config.softmax_type!r} "
                                      "is not supported (only 'vanilla')")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"PortableAttention supports causal masks only, got {attn_mask_type}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        tp = self.tp_group.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        head_dim = divide(projection, config.num_attention_heads)
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the fp32
        # scores back by it in megatron: the net scale is unchanged, so SDPA takes it directly.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("PortableAttention: attention_bias is not supported")
        qkv_format, cu = "sbhd", None
        cp_group = self.cp_group if self.cp_group is not None and self.cp_group.size() > 1 else None
        if packed_seq_params is not None:
            qkv_format = packed_seq_params.qkv_format or "thd"
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            if packed_seq_params.cp_group is not None and packed_seq_params.cp_group.size() > 1:
                cp_group = packed_seq_params.cp_group
            attention_mask = None  # the segments define the mask (as with TE's thd path)
        if not value.is_contiguous():
            # value is a view into the fused QKV projection's output: kept for the backward it would
            # keep that whole buffer alive (2.57 s*b*h bytes on the 7B shape, whose q and k parts the
            # backward already holds as their RoPE'd copies); a copy of v alone is 0.29.
            value = value.contiguous()
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(query, key, value, dropout_p, qkv_format, cu, cp_group, attention_mask)
        else:
            out = self._attend(query, key, value, dropout_p, qkv_format, cu, cp_group, attention_mask)
        # [s, b, np, hn] -> [s, b, hp]; [t, np, hn] -> [t, hp]
        return out.reshape(*out.shape[:-2], self.hidden_size_per_partition)

    def _attend(self, query, key, value, dropout_p, qkv_format, cu, cp_group, attention_mask):
        return portable_attention(query, key, value, scale=self.softmax_scale, dropout_p=dropout_p,
                                  qkv_format=qkv_format, cu_seqlens=cu, cp_group=cp_group,
                                  attention_mask=attention_mask, backend=type(self).backend)
