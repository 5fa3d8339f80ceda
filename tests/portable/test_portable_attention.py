"""Portable attention against a plain fp64 softmax(QK^T)V reference: causal, GQA, packed samples."""
import math

import pytest
import torch

from hpctrain.model.portable.attention import portable_attention

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32 kernels vs the fp64 reference


def reference(q, k, v, cu_seqlens=None):
    """Unfused fp64 attention on [t, h, d] (one stream): repeated K/V, explicit doc-causal mask."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t = q.shape[0]
    pos = torch.arange(t)
    mask = pos[None, :] <= pos[:, None]
    if cu_seqlens is not None:
        doc = torch.bucketize(pos, torch.as_tensor(cu_seqlens)[1:], right=True)
        mask &= doc[None, :] == doc[:, None]
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _qkv(t, hq=4, hkv=2, d=8, b=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (t, b) if b else (t,)
    return [torch.randn(*shape, h, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv)]


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


def test_causal_gqa_sbhd_matches_reference_forward_and_grads():
    q, k, v = _qkv(12, b=2)
    out = portable_attention(q, k, v, qkv_format="sbhd")
    for bi in range(2):
        ref = reference(q[:, bi], k[:, bi], v[:, bi])
        torch.testing.assert_close(out[:, bi].double(), ref, **TOL)
    got = _grads(out, (q, k, v))
    ref_out = torch.stack([reference(q[:, bi], k[:, bi], v[:, bi]) for bi in range(2)], dim=1)
    want = _grads(ref_out, (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_packed_thd_matches_reference(backend):
    cu = torch.tensor([0, 5, 9, 16, 20], dtype=torch.int32)
    q, k, v = _qkv(20, hq=6, hkv=2)
    out = portable_attention(q, k, v, qkv_format="thd", cu_seqlens=cu, backend=backend)
    ref = reference(q, k, v, cu.tolist())
    torch.testing.assert_close(out.double(), ref, **TOL)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


def test_packed_samples_do_not_see_each_other():
    cu = torch.tensor([0, 6, 11, 16], dtype=torch.int32)
    q, k, v = _qkv(16)
    out = portable_attention(q, k, v, qkv_format="thd", cu_seqlens=cu)
    # Change every token of sample 1 (positions 6..10): samples 0 and 2 must not move at all.
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[6:11] = torch.randn_like(x[6:11]) * 3
    out2 = portable_attention(q2, k2, v2, qkv_format="thd", cu_seqlens=cu)
    keep = torch.cat([torch.arange(0, 6), torch.arange(11, 16)])
    torch.testing.assert_close(out2[keep], out[keep].detach(), atol=1e-6, rtol=0)
    assert not torch.allclose(out2[6:11], out[6:11].detach())
    # And the gradient of sample 0's outputs is zero on every other sample's K/V.
    gk, gv = torch.autograd.grad(out[:6].sum(), (k, v))
    assert gk[6:].abs().max() == 0 and gv[6:].abs().max() == 0


def test_packed_sbhd_rows_equal_thd_stream():
    s, b = 8, 2
    cu = torch.tensor([0, 3, 8, 13, 16], dtype=torch.int32)  # over the flattened b*s stream
    q, k, v = _qkv(s, b=b)
    out = portable_attention(q, k, v, qkv_format="sbhd", cu_seqlens=cu)
    flat = [x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (q, k, v)]
    ref = reference(*flat, cu.tolist())
    torch.testing.assert_close(out.transpose(0, 1).reshape(b * s, *out.shape[2:]).double(), ref, **TOL)


def test_flex_block_mask_forward_matches_reference():
    """The CUDA path's document-causal flex mask, checked forward on CPU (flex has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    cu = torch.tensor([0, 40, 100, 128], dtype=torch.int32)
    q, k, v = (x.detach() for x in _qkv(128, hq=4, hkv=2, d=16))
    with torch.no_grad():
        out = portable_attention(q, k, v, qkv_format="thd", cu_seqlens=cu, backend="flex")
    torch.testing.assert_close(out.double(), reference(q, k, v, cu.tolist()), **TOL)


def test_explicit_attention_mask_replaces_causal():
    q, k, v = _qkv(6, b=1, hq=2, hkv=2)
    masked_out = torch.ones(1, 1, 6, 6, dtype=torch.bool).triu(1)  # megatron: True = masked
    out = portable_attention(q, k, v, attention_mask=masked_out)
    torch.testing.assert_close(out[:, 0].double(), reference(q[:, 0], k[:, 0], v[:, 0]), **TOL)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(6, b=1)
    with pytest.raises(ValueError, match="qkv_format"):
        portable_attention(q, k, v, qkv_format="bshd")
    with pytest.raises(ValueError, match="backend"):
        portable_attention(q, k, v, backend="te")
