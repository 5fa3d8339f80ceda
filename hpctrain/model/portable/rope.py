"""RoPE for packed (`thd`) sequences without per-layer host syncs.

megatron-core 0.16.1's unfused thd RoPE (`rope_utils._apply_rotary_pos_emb_thd`) calls
`cu_seqlens.tolist()` (a device->host sync) and splits the stream into one tensor per sample, for
the queries and the keys of every layer: 2 x layers syncs and ~4 x samples x layers small kernels
per forward, which leaves a GPU idle on small models. Here each token's position inside its sample
is computed once per micro-batch (cached with the attention's masking plan, see attention._Plan)
and the rotary table is gathered with one index, so every layer runs the same few kernels with no
sync. Results are identical to megatron's function (tests/portable/test_portable_rope.py).

`install()` swaps the function in megatron's rope_utils module; PortableAttention calls it, so the
swap is active whenever the portable spec is used. Per-token frequency tables (freqs with one row per
token, megatron's "exact mapping" case) are passed through to the original function.
"""
from __future__ import annotations

import torch

_ORIGINAL = {}


def _fast_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
              mscale=1.0, cp_group=None):
    from megatron.core.models.common.embeddings import rope_utils

    from hpctrain.model.portable.attention import _get_plan

    original = _ORIGINAL["thd"]
    cp_size = cp_group.size() if cp_group is not None else 1
    cp_rank = cp_group.rank() if cp_size > 1 else 0
    total = t.shape[0] * cp_size
    if freqs.dim() >= 1 and freqs.size(0) == total and cu_seqlens.numel() > 2:
        return original(t, cu_seqlens, freqs, rotary_interleaved, multi_latent_attention, mscale,
                        cp_group)
    plan = _get_plan(cu_seqlens, total, t.shape[0], cp_size, cp_rank, t.device)
    if rotary_interleaved or multi_latent_attention or mscale != 1.0 or freqs.shape[-1] != t.shape[-1]:
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs.index_select(0, plan.positions()), rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)
    cos, sin = _tables(plan, freqs, t.dtype)
    return _rotate()(t, cos, sin)


def _tables(plan, freqs, dtype):
    """cos/sin of every token's angles, [t, 1, d] in the activations' dtype: made once per
    micro-batch and shared by the q and k of every layer (megatron-core recomputes and keeps them
    per call), cached on the attention plan."""
    key = ("rope", freqs.data_ptr(), freqs.shape[0], dtype)
    hit = plan.cache.get(key)
    if hit is None:
        f = freqs.index_select(0, plan.positions()).reshape(-1, 1, freqs.shape[-1])
        hit = plan.cache[key] = (torch.cos(f).to(dtype), torch.sin(f).to(dtype))
    return hit


def _rotate_eager(t, cos, sin):
    """t * cos + rotate_half(t) * sin (megatron-core's non-interleaved RoPE, same expression)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


_COMPILED: dict = {}


def _rotate():
    """On CUDA one compiled kernel each way instead of ~8 (fixed shapes: packed rows are padded to
    one length on GPUs), else the eager expression."""
    if not torch.cuda.is_available():
        return _rotate_eager
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_rotate_eager, dynamic=False)
    return _COMPILED["fn"]


def install() -> None:
    """Use the sync-free thd RoPE in megatron-core (idempotent)."""
    from megatron.core.models.common.embeddings import rope_utils

    if "thd" not in _ORIGINAL:
        _ORIGINAL["thd"] = rope_utils._apply_rotary_pos_emb_thd
        rope_utils._apply_rotary_pos_emb_thd = _fast_thd


def original_thd():
    """megatron-core's own thd RoPE function (for tests)."""
    from megatron.core.models.common.embeddings import rope_utils

    return _ORIGINAL.get("thd", rope_utils._apply_rotary_pos_emb_thd)


__all__ = ["install", "original_thd"]
