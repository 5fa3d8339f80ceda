#!/usr/bin/env python3
"""GPU check + micro-benchmark of the portable attention paths (run first in a GPU lease).

Packed samples (thd, GQA): the CUDA path (torch.compile'd flex_attention, document-causal BlockMask)
against SDPA with an explicit boolean block-diagonal causal mask, forward and gradients, in bf16
(tolerance below), then the time of forward+backward for: flex (packed), SDPA explicit mask
(packed), SDPA is_causal over the same tokens as dense rows (no packing: a lower bound).
On a CPU it checks the forward only (flex_attention has no CPU backward) at a small size.

  python tools/bench/check_attention.py [--tokens 8192 --samples 8 --heads 14 --kv-heads 2 --dim 64]
Prints one JSON line; exits 1 if the paths disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hpctrain.model.portable.attention import portable_attention  # noqa: E402

TOL = 3e-2  # bf16, relative to the reference's max magnitude


def _inputs(t, hq, hkv, d, device, dtype, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(t, h, d, generator=g).to(device, dtype).requires_grad_(grad)
            for h in (hq, hkv, hkv)]


def _time(fn, device, reps=20):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _check_cp_lower_right(args, device, dtype, cuda):
    """Unpacked context parallel's kernel (SDPA + causal_lower_right, GQA) vs an explicit mask.

    Simulates CP=2 rank r (no process group): local queries = chunks r and 3-r, K/V in global order.
    """
    from hpctrain.model.portable.attention import _cp_causal, _Plan, _sdpa
    total = 4096 if cuda else 128
    errs = {}
    for rank in range(2):
        plan = _Plan(None, total, total // 2, 2, rank, device)
        q = _inputs(total, args.heads, args.kv_heads, args.dim, device, dtype, True)[0]
        q = q[plan.q_index].detach().requires_grad_()
        _, k, v = _inputs(total, args.heads, args.kv_heads, args.dim, device, dtype, True)
        q4, k4, v4 = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
        scale = 1.0 / args.dim ** 0.5
        fast = _cp_causal(q4, k4, v4, plan, scale, 0.0, True)
        ref = _sdpa(q4, k4, v4, scale, 0.0, True, mask=plan.dense_mask())
        go = torch.randn_like(ref)
        errs[f"cp{rank}_out"] = (fast - ref).abs().max().item() / ref.abs().max().item()
        for name, a, b in zip("qkv", torch.autograd.grad(fast, (q, k, v), go),
                              torch.autograd.grad(ref, (q, k, v), go)):
            errs[f"cp{rank}_d{name}"] = (a - b).abs().max().item() / b.abs().max().item()
    return errs


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t = args.tokens if cuda else 256
    n = args.samples
    bounds = torch.linspace(0, t, n + 1).round().long()
    cu = bounds.to(torch.int32).to(device)
    q, k, v = _inputs(t, args.heads, args.kv_heads, args.dim, device, dtype, grad=cuda)
    kw = dict(qkv_format="thd", cu_seqlens=cu)
    result = {"kind": "attention_check", "device": torch.cuda.get_device_name() if cuda else "cpu",
              "tokens": t, "samples": n, "heads": args.heads, "kv_heads": args.kv_heads,
              "dim": args.dim, "torch": torch.__version__}
    ref = portable_attention(q, k, v, backend="sdpa", **kw)
    out = portable_attention(q, k, v, backend="flex", **kw)
    scale = ref.detach().abs().max().item()
    errs = {"out": (out - ref).abs().max().item() / scale}
    if cuda:
        go = torch.randn_like(ref)
        g_ref = torch.autograd.grad(ref, (q, k, v), go)
        g_out = torch.autograd.grad(out, (q, k, v), go)
        for name, a, b in zip("qkv", g_out, g_ref):
            errs["d" + name] = (a - b).abs().max().item() / b.abs().max().item()
    errs.update(_check_cp_lower_right(args, device, dtype, cuda))
    result["max_rel_err"] = {k_: round(v_, 5) for k_, v_ in errs.items()}
    result["ok"] = all(e < TOL for e in errs.values())
    if cuda:
        def fwd_bwd(backend=None, dense=False):
            def run():
                if dense:  # same tokens as n/ (t/n)... rows of equal length, plain causal
                    rows = [x.view(n, t // n, *x.shape[1:]).transpose(0, 1) for x in (q, k, v)]
                    o = portable_attention(*rows, qkv_format="sbhd")
                    # o is [s, b, h, d]: lay the same upstream gradient out the same way.
                    g = go.view(n, t // n, *go.shape[1:]).transpose(0, 1)
                else:
                    o = portable_attention(q, k, v, backend=backend, **kw)
                    g = go
                torch.autograd.grad(o, (q, k, v), g)
            return run
        result["ms_fwd_bwd"] = {
            "flex_packed": round(_time(fwd_bwd("flex"), device), 3),
            "sdpa_mask_packed": round(_time(fwd_bwd("sdpa"), device), 3),
            "sdpa_causal_dense_rows": round(_time(fwd_bwd(dense=True), device), 3),
        }
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
