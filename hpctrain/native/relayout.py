"""Re-layout copies for checkpoint conversion and resharding, on one native strided-copy kernel.

Every helper turns its job into (dst_view, src_view) pairs of numpy views (slicing a memory-mapped
file is free) and hands them to hpctrain._C.copy_views, which copies them on `threads` threads with
the GIL released. Nothing is materialised in Python: the source may be a np.memmap of a
safetensors tensor, the destination a preallocated numpy array or torch tensor.

Arrays: numpy arrays (memmaps included) or CPU torch tensors, C-contiguous, same dtype on both
sides. bfloat16 is copied as raw 2-byte elements: a torch bf16 tensor and an int16/uint16 view of a
bf16 safetensors region are interchangeable. Source and destination must not overlap.

Megatron layouts (megatron-core 0.16.1, Attention.get_query_key_value_tensors and
ColumnParallelLinear): the fused linear_qkv weight/bias of a TP rank holds its query groups
g = rank*G/tp .. (rank+1)*G/tp - 1, each as [q heads of g (heads_per_group*head_dim rows); k_g
(head_dim rows); v_g (head_dim rows)]. A gated MLP's linear_fc1 on TP rank r is
[gate_shard_r; up_shard_r] (each ffn/tp rows).
"""
from __future__ import annotations

import os

import numpy as np

from hpctrain import _C
from hpctrain.native import twins
from hpctrain.native._checks import check_impl

_RAW16 = {np.dtype(np.int16), np.dtype(np.uint16), np.dtype("V2")}


def default_threads() -> int:
    """HPCTRAIN_RELAYOUT_THREADS, else min(8, cpu count)."""
    env = os.environ.get("HPCTRAIN_RELAYOUT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def as_array(x, name: str = "array", *, writable: bool = False) -> np.ndarray:
    """A numpy view of a numpy array or CPU torch tensor (bf16 -> int16 view), C-contiguous."""
    if type(x).__module__.startswith("torch"):
        import torch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
        x = x.detach()
        x = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(x).__name__}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {x.strides}); use np.ascontiguousarray")
    if writable and not x.flags.writeable:
        raise ValueError(f"{name} is read-only; the destination must be writable")
    return x


def copy_blocks(pairs, *, threads: int | None = None, impl: str = "native") -> int:
    """dst[...] = src[...] for every (dst, src) pair of equal-shape numpy views (any strides).

    The low-level entry point: build views with slicing/reshape and copy them all in one call.
    Returns the bytes copied.
    """
    check_impl(impl)
    pairs = list(pairs)
    for i, (dst, src) in enumerate(pairs):
        if dst.shape != src.shape:
            raise ValueError(f"pair {i}: shape mismatch, dst {dst.shape} vs src {src.shape}")
        _check_dtypes(dst.dtype, src.dtype, f"pair {i}")
    if impl == "python":
        return twins.copy_views(pairs)
    return _C.copy_views(pairs, threads or default_threads())


def split_dim(src, dim: int, parts, *, outs=None, threads: int | None = None, impl: str = "native"):
    """Split `src` along `dim` into `parts` (a count of equal parts, or a list of sizes).

    Writes into `outs` when given (preallocated, right shapes), else into new arrays; returns them.
    """
    src = as_array(src, "src")
    dim = _axis(dim, src.ndim)
    sizes = _part_sizes(src.shape[dim], parts, dim)
    if outs is None:
        outs = [np.empty(_with(src.shape, dim, n), dtype=src.dtype) for n in sizes]
    else:
        if len(outs) != len(sizes):
            raise ValueError(f"got {len(outs)} outputs for {len(sizes)} parts")
        outs = [as_array(o, f"outs[{i}]", writable=True) for i, o in enumerate(outs)]
    pairs, start = [], 0
    for o, n in zip(outs, sizes):
        pairs.append((o, _slab(src, dim, start, n)))
        start += n
    copy_blocks(pairs, threads=threads, impl=impl)
    return outs


def concat_dim(srcs, dim: int, out=None, *, threads: int | None = None, impl: str = "native"):
    """Concatenate `srcs` along `dim` into `out` (preallocated, or new); returns it."""
    srcs = [as_array(s, f"srcs[{i}]") for i, s in enumerate(srcs)]
    if not srcs:
        raise ValueError("concat_dim needs at least one source")
    dim = _axis(dim, srcs[0].ndim)
    total = sum(s.shape[dim] for s in srcs)
    shape = _with(srcs[0].shape, dim, total)
    out = np.empty(shape, dtype=srcs[0].dtype) if out is None else as_array(out, "out", writable=True)
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, concatenation along dim {dim} gives {shape}")
    pairs, start = [], 0
    for s in srcs:
        pairs.append((_slab(out, dim, start, s.shape[dim]), s))
        start += s.shape[dim]
    copy_blocks(pairs, threads=threads, impl=impl)
    return out


def shard_dim(src, dim: int, tp: int, rank: int, out=None, *, threads: int | None = None,
              impl: str = "native"):
    """TP shard `rank` of `tp` equal parts of `src` along `dim` (e.g. a column-parallel weight)."""
    src = as_array(src, "src")
    dim = _axis(dim, src.ndim)
    n = _shard_rows(src.shape[dim], tp, rank, f"dim {dim}")
    return _copy_into(out, _slab(src, dim, rank * n, n), threads, impl)


def unshard_dim(shard, dim: int, tp: int, rank: int, out, *, threads: int | None = None,
                impl: str = "native"):
    """Write TP shard `rank` into its place along `dim` of the full tensor `out`."""
    shard, out = as_array(shard, "shard"), as_array(out, "out", writable=True)
    dim = _axis(dim, out.ndim)
    n = _shard_rows(out.shape[dim], tp, rank, f"dim {dim}")
    copy_blocks([(_slab(out, dim, rank * n, n), shard)], threads=threads, impl=impl)
    return out


def qkv_to_mcore(q, k, v, num_query_groups: int, heads_per_group: int, head_dim: int,
                 tp: int = 1, rank: int = 0, out=None, *, threads: int | None = None, impl: str = "native"):
    """HF q [nh*d, ...], k, v [ng*d, ...] (weights or biases) -> megatron linear_qkv of TP `rank`.

    Output rows: for each group g of the rank, [q heads of g; k_g; v_g]; shape
    [ng/tp * (heads_per_group + 2) * head_dim, ...].
    """
    q, k, v = (as_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    qg, kg, vg = _groups(q, k, v, num_query_groups, heads_per_group, head_dim)
    per = _shard_rows(num_query_groups, tp, rank, "num_query_groups")
    rows = (heads_per_group + 2) * head_dim
    if out is None:
        out = np.empty((per * rows,) + q.shape[1:], dtype=q.dtype)
    out = as_array(out, "out", writable=True)
    if out.shape != (per * rows,) + q.shape[1:]:
        raise ValueError(f"out has shape {out.shape}, expected {(per * rows,) + q.shape[1:]}")
    og = out.reshape((per, rows) + q.shape[1:])
    qn, sl = heads_per_group * head_dim, slice(rank * per, (rank + 1) * per)
    pairs = [(og[:, :qn], qg[sl]), (og[:, qn:qn + head_dim], kg[sl]), (og[:, qn + head_dim:], vg[sl])]
    copy_blocks(pairs, threads=threads, impl=impl)
    return out


def qkv_from_mcore(shard, num_query_groups: int, heads_per_group: int, head_dim: int,
                   tp: int, rank: int, q, k, v, *, threads: int | None = None, impl: str = "native"):
    """Scatter TP rank `rank`'s fused linear_qkv rows into the full HF q, k, v (preallocated).

    Call once per rank (any order, e.g. one shard file at a time) to rebuild q, k, v.
    """
    shard = as_array(shard, "shard")
    q, k, v = (as_array(a, n, writable=True) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    qg, kg, vg = _groups(q, k, v, num_query_groups, heads_per_group, head_dim)
    per = _shard_rows(num_query_groups, tp, rank, "num_query_groups")
    rows = (heads_per_group + 2) * head_dim
    if shard.shape != (per * rows,) + q.shape[1:]:
        raise ValueError(f"shard has shape {shard.shape}, expected {(per * rows,) + q.shape[1:]}")
    sg = shard.reshape((per, rows) + q.shape[1:])
    qn, sl = heads_per_group * head_dim, slice(rank * per, (rank + 1) * per)
    pairs = [(qg[sl], sg[:, :qn]), (kg[sl], sg[:, qn:qn + head_dim]), (vg[sl], sg[:, qn + head_dim:])]
    copy_blocks(pairs, threads=threads, impl=impl)
    return q, k, v


def gated_mlp_to_mcore(gate, up, tp: int = 1, rank: int = 0, out=None, *, threads: int | None = None,
                       impl: str = "native"):
    """HF gate_proj, up_proj [ffn, ...] -> megatron linear_fc1 of TP `rank`: [gate_r; up_r]."""
    gate, up = as_array(gate, "gate"), as_array(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    n = _shard_rows(gate.shape[0], tp, rank, "ffn_hidden_size")
    shape = (2 * n,) + gate.shape[1:]
    out = np.empty(shape, dtype=gate.dtype) if out is None else as_array(out, "out", writable=True)
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    s = slice(rank * n, (rank + 1) * n)
    copy_blocks([(out[:n], gate[s]), (out[n:], up[s])], threads=threads, impl=impl)
    return out


def gated_mlp_from_mcore(shard, tp: int, rank: int, gate, up, *, threads: int | None = None,
                         impl: str = "native"):
    """Scatter TP rank `rank`'s linear_fc1 [gate_r; up_r] into the full HF gate, up (preallocated)."""
    shard = as_array(shard, "shard")
    gate, up = as_array(gate, "gate", writable=True), as_array(up, "up", writable=True)
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    n = _shard_rows(gate.shape[0], tp, rank, "ffn_hidden_size")
    if shard.shape != (2 * n,) + gate.shape[1:]:
        raise ValueError(f"shard has shape {shard.shape}, expected {(2 * n,) + gate.shape[1:]}")
    s = slice(rank * n, (rank + 1) * n)
    copy_blocks([(gate[s], shard[:n]), (up[s], shard[n:])], threads=threads, impl=impl)
    return gate, up


# --- helpers ------------------------------------------------------------------------------
def _check_dtypes(d: np.dtype, s: np.dtype, where: str) -> None:
    if d == s or (d in _RAW16 and s in _RAW16):
        return
    raise TypeError(f"{where}: dtype mismatch, dst {d} vs src {s} (bf16 travels as int16/uint16; "
                    "convert dtypes before re-layout)")


def _axis(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for a {ndim}-D array")
    return dim % ndim


def _with(shape, dim, n):
    return tuple(shape[:dim]) + (n,) + tuple(shape[dim + 1:])


def _slab(a: np.ndarray, dim: int, start: int, n: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[dim] = slice(start, start + n)
    return a[tuple(index)]


def _part_sizes(extent: int, parts, dim: int) -> list[int]:
    if isinstance(parts, (int, np.integer)):
        if parts < 1 or extent % parts:
            raise ValueError(f"cannot split dim {dim} of size {extent} into {parts} equal parts")
        return [extent // int(parts)] * int(parts)
    sizes = [int(p) for p in parts]
    if any(p < 0 for p in sizes) or sum(sizes) != extent:
        raise ValueError(f"part sizes {sizes} must be >= 0 and sum to dim {dim}'s size {extent}")
    return sizes


def _shard_rows(extent: int, tp: int, rank: int, what: str) -> int:
    if tp < 1 or not 0 <= rank < tp:
        raise ValueError(f"need tp >= 1 and 0 <= rank < tp, got tp={tp}, rank={rank}")
    if extent % tp:
        raise ValueError(f"{what} = {extent} is not divisible by tp = {tp}")
    return extent // tp


def _groups(q, k, v, ng: int, hpg: int, d: int):
    rest = q.shape[1:]
    expect = {"q": (ng * hpg * d,) + rest, "k": (ng * d,) + rest, "v": (ng * d,) + rest}
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.shape != expect[name]:
            raise ValueError(f"{name} has shape {a.shape}, expected {expect[name]} "
                             f"(num_query_groups={ng}, heads_per_group={hpg}, head_dim={d})")
    return (q.reshape((ng, hpg * d) + rest), k.reshape((ng, d) + rest), v.reshape((ng, d) + rest))


def _copy_into(out, view: np.ndarray, threads, impl):
    out = np.empty(view.shape, dtype=view.dtype) if out is None else as_array(out, "out", writable=True)
    if out.shape != view.shape:
        raise ValueError(f"out has shape {out.shape}, expected {view.shape}")
    copy_blocks([(out, view)], threads=threads, impl=impl)
    return out
