"""Re-layout copies: native == twin, split/concat round trips bit-exact, megatron interleavings."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpctrain import _C
from hpctrain.native import (
    concat_dim, copy_blocks, gated_mlp_from_mcore, gated_mlp_to_mcore, qkv_from_mcore, qkv_to_mcore,
    shard_dim, split_dim, twins, unshard_dim,
)

DTYPES = [np.float32, np.float16, np.int32, np.int64, np.int8, "bf16"]


def random_array(rng, shape, dtype):
    if dtype == "bf16":  # bf16 travels as raw 2-byte elements: a torch bf16 tensor
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def raw(x):
    return x.view(torch.int16).numpy() if isinstance(x, torch.Tensor) else x


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.sampled_from(DTYPES),
       st.integers(0, 3), st.integers(1, 4), st.integers(0, 2**31), st.integers(1, 3))
def test_split_then_concat_round_trip(shape, dtype, dim, parts, seed, threads):
    rng = np.random.default_rng(seed)
    dim = dim % len(shape)
    shape[dim] *= parts
    src = random_array(rng, tuple(shape), dtype)
    pieces = split_dim(src, dim, parts, threads=threads)
    twin = split_dim(src, dim, parts, impl="python")
    expect = np.split(raw(src), parts, axis=dim)
    for p, t, e in zip(pieces, twin, expect):
        assert np.array_equal(p, e) and np.array_equal(t, e)
    out = torch.empty_like(src) if isinstance(src, torch.Tensor) else None
    merged = concat_dim(pieces, dim, out, threads=threads)
    assert raw(merged).tobytes() == raw(src).tobytes()  # bit-exact


def test_uneven_parts_and_big_multithreaded_copy():
    rng = np.random.default_rng(1)
    src = rng.standard_normal((301, 517)).astype(np.float32)  # odd shape, > 1 MiB: threads split runs
    pieces = split_dim(src, 1, [100, 0, 417], threads=4)
    assert [p.shape for p in pieces] == [(301, 100), (301, 0), (301, 417)]
    assert np.array_equal(np.concatenate(pieces, axis=1), src)
    out = np.empty_like(src)
    assert _C.copy_views([(out, src)], 3) == src.nbytes and np.array_equal(out, src)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bf16"])
@pytest.mark.parametrize("ng,hpg,d,tp", [(2, 3, 4, 1), (2, 3, 4, 2), (4, 1, 6, 4), (1, 4, 2, 1)])
def test_qkv_matches_twin_and_round_trips(dtype, ng, hpg, d, tp):
    rng = np.random.default_rng(ng * 100 + tp)
    hidden = 5
    q = random_array(rng, (ng * hpg * d, hidden), dtype)
    k = random_array(rng, (ng * d, hidden), dtype)
    v = random_array(rng, (ng * d, hidden), dtype)
    q_out, k_out, v_out = (np.empty_like(raw(x)) for x in (q, k, v))
    full = twins.qkv_to_mcore(raw(q), raw(k), raw(v), ng, hpg, d, 1, 0)
    for rank in range(tp):
        shard = qkv_to_mcore(q, k, v, ng, hpg, d, tp, rank)
        assert np.array_equal(shard, twins.qkv_to_mcore(raw(q), raw(k), raw(v), ng, hpg, d, tp, rank))
        # megatron's ColumnParallelLinear: rank r holds the r-th contiguous chunk of the full rows
        assert np.array_equal(shard, np.split(full, tp)[rank])
        qkv_from_mcore(shard, ng, hpg, d, tp, rank, q_out, k_out, v_out)
    for got, want in zip((q_out, k_out, v_out), (q, k, v)):
        assert got.tobytes() == raw(want).tobytes()


def test_qkv_bias_and_explicit_layout():
    ng, hpg, d = 2, 2, 1  # q heads 0,1 in group 0; 2,3 in group 1
    q, k, v = np.array([0., 1, 2, 3]), np.array([10., 11]), np.array([20., 21])
    fused = qkv_to_mcore(q, k, v, ng, hpg, d)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert qkv_to_mcore(q, k, v, ng, hpg, d, tp=2, rank=1).tolist() == [2, 3, 11, 21]
    qs, ks, vs = twins.qkv_from_mcore([fused[:4], fused[4:]], ng, hpg, d)
    assert qs.tolist() == q.tolist() and ks.tolist() == k.tolist() and vs.tolist() == v.tolist()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_mlp_matches_twin_and_round_trips(tp):
    rng = np.random.default_rng(tp)
    gate = torch.randn(8, 3).to(torch.bfloat16)
    up = torch.randn(8, 3).to(torch.bfloat16)
    g_out, u_out = torch.empty_like(gate), torch.empty_like(up)
    shards = []
    for rank in range(tp):
        out = torch.empty(16 // tp, 3, dtype=torch.bfloat16)
        gated_mlp_to_mcore(gate, up, tp, rank, out)
        assert np.array_equal(raw(out), twins.gated_mlp_to_mcore(raw(gate), raw(up), tp, rank))
        assert torch.equal(out, torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]))
        gated_mlp_from_mcore(out, tp, rank, g_out, u_out)
        shards.append(raw(out))
    assert torch.equal(g_out, gate) and torch.equal(u_out, up)
    g2, u2 = twins.gated_mlp_from_mcore(shards)
    assert np.array_equal(g2, raw(gate)) and np.array_equal(u2, raw(up))
    del rng


def test_shard_and_unshard_dim_with_memmap(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((6, 10)).astype(np.float32)
    path = tmp_path / "w.bin"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(6, 10))  # a read-only mapped source
    full = np.zeros_like(data)
    for rank in range(2):
        shard = shard_dim(mm, 1, 2, rank)
        assert np.array_equal(shard, data[:, rank * 5:(rank + 1) * 5])
        unshard_dim(shard, 1, 2, rank, full)
    assert np.array_equal(full, data)


def test_bad_input():
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        copy_blocks([(a, np.zeros((4, 3), np.float32))])
    with pytest.raises(TypeError, match="dtype mismatch"):
        copy_blocks([(a, np.zeros((4, 4), np.float64))])
    with pytest.raises(TypeError, match="dtype mismatch"):  # fp16 into a bf16 (int16) buffer
        concat_dim([np.zeros((2, 4), np.float16)], 0, torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="C-contiguous"):
        split_dim(a[:, ::2], 0, 2)
    with pytest.raises(ValueError, match="contiguous"):
        split_dim(torch.zeros(4, 4).t(), 0, 2)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros((4, 4), np.float32)
        ro.flags.writeable = False
        concat_dim([a], 0, ro)
    with pytest.raises(ValueError, match="cannot split dim 1 of size 4 into 3"):
        split_dim(a, 1, 3)
    with pytest.raises(ValueError, match="num_query_groups = 3 is not divisible by tp = 2"):
        qkv_to_mcore(np.zeros((6, 2)), np.zeros((3, 2)), np.zeros((3, 2)), 3, 2, 1, tp=2, rank=0)
    with pytest.raises(ValueError, match=r"k has shape \(4, 2\), expected \(3, 2\)"):
        qkv_to_mcore(np.zeros((6, 2)), np.zeros((4, 2)), np.zeros((3, 2)), 3, 2, 1)
    with pytest.raises(ValueError, match="rank"):
        gated_mlp_to_mcore(np.zeros((4, 2)), np.zeros((4, 2)), tp=2, rank=2)
    with pytest.raises(TypeError, match="numpy array or torch.Tensor"):
        split_dim([1, 2, 3], 0, 3)


def test_native_kernel_validates_without_crashing():
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        _C.copy_views([(a, np.zeros((2, 4), np.float32))], 1)
    with pytest.raises(TypeError, match="item sizes differ"):
        _C.copy_views([(a, np.zeros((4, 4), np.float64))], 1)
    with pytest.raises(ValueError, match="threads"):
        _C.copy_views([(a, a.copy())], 0)
    ro = np.zeros((4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(Exception, match="read-only|writable|not writable"):
        _C.copy_views([(ro, a)], 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(-3, 3).filter(bool)), min_size=1, max_size=4),
       st.sampled_from([np.float32, np.float16, np.int64, np.int8]), st.integers(1, 3))
def test_copy_blocks_strided_views_native_equals_twin(dims, dtype, threads):
    rng = np.random.default_rng(len(dims))
    base = random_array(rng, tuple(n * abs(s) for n, s in dims), dtype)
    view = base[tuple(slice(None, None, s) for _, s in dims)]  # strided, possibly reversed
    a, b = np.zeros(view.shape, dtype), np.zeros(view.shape, dtype)
    assert copy_blocks([(a, view)], threads=threads) == a.nbytes
    copy_blocks([(b, view)], impl="python")
    assert np.array_equal(a, view) and np.array_equal(a, b)
    c = np.zeros_like(base)  # strided destination too
    copy_blocks([(c[tuple(slice(None, None, s) for _, s in dims)], a)], threads=threads)
    assert np.array_equal(c[tuple(slice(None, None, s) for _, s in dims)], view)


def test_safetensors_mmap_to_mcore_qkv(tmp_path):
    from safetensors.torch import save_file

    from hpctrain.native import mmap_safetensors
    ng, hpg, d, hidden = 2, 2, 3, 4
    tensors = {"q": torch.randn(ng * hpg * d, hidden).to(torch.bfloat16),
               "k": torch.randn(ng * d, hidden).to(torch.bfloat16),
               "v": torch.randn(ng * d, hidden).to(torch.bfloat16),
               "b": torch.arange(5, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    mm = mmap_safetensors(tmp_path / "m.safetensors")
    assert mm["q"].dtype == np.uint16 and np.array_equal(mm["b"], np.arange(5, dtype=np.float32))
    out = torch.empty((ng * (hpg + 2) * d, hidden), dtype=torch.bfloat16)
    qkv_to_mcore(mm["q"], mm["k"], mm["v"], ng, hpg, d, 1, 0, out)  # bf16 mmap -> bf16 tensor
    expect = twins.qkv_to_mcore(*(raw(tensors[n]) for n in "qkv"), ng, hpg, d, 1, 0)
    assert np.array_equal(raw(out), expect)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        mmap_safetensors(tmp_path / "bad.safetensors")


def test_native_kernel_rejects_non_buffers():
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="not a \\(dst, src\\) tuple"):
        _C.copy_views([a], 1)
    with pytest.raises(TypeError, match="buffer protocol"):
        _C.copy_views([(a, [1, 2, 3, 4])], 1)
