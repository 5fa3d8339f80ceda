"""Benchmark re-layout copies: hpctrain native kernel vs torch narrow/cat/clone vs plain memcpy.

Shapes are Qwen2.5-7B's (bf16): the fused QKV of TP rank 0 of 2 built from HF q, k, v; the gated
MLP linear_fc1 of TP rank 0 of 2 from gate_proj/up_proj; a whole-tensor split along dim 0 and
along the last dim (strided). Destinations are preallocated and touched once before timing, for
every method alike. GB/s counts bytes written (each byte is also read once). The memcpy reference
is a raw memcpy of a buffer of the same size, split over the same thread count, in the same run.

    python tools/bench/bench_relayout.py [--threads 1 2] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from hpctrain import _C
from hpctrain.native import gated_mlp_to_mcore, qkv_to_mcore, split_dim

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 3584, 28, 4, 128, 18944


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up (and first touch of any new buffer)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cases():
    g = torch.Generator().manual_seed(0)
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    q, k, v = bf(HEADS * HEAD_DIM, HIDDEN), bf(GROUPS * HEAD_DIM, HIDDEN), bf(GROUPS * HEAD_DIM, HIDDEN)
    gate, up = bf(FFN, HIDDEN), bf(FFN, HIDDEN)
    hpg, d = HEADS // GROUPS, HEAD_DIM
    qkv_out = torch.empty((GROUPS // 2) * (hpg + 2) * d, HIDDEN, dtype=torch.bfloat16)
    fc1_out = torch.empty(FFN, HIDDEN, dtype=torch.bfloat16)
    halves0 = [torch.empty(FFN // 2, HIDDEN, dtype=torch.bfloat16) for _ in range(2)]
    halves1 = [torch.empty(FFN, HIDDEN // 2, dtype=torch.bfloat16) for _ in range(2)]

    def torch_qkv():
        parts = []
        for grp in range(GROUPS // 2):
            parts += [q.narrow(0, grp * hpg * d, hpg * d), k.narrow(0, grp * d, d), v.narrow(0, grp * d, d)]
        torch.cat(parts, out=qkv_out)

    def torch_fc1():
        torch.cat([gate.narrow(0, 0, FFN // 2), up.narrow(0, 0, FFN // 2)], out=fc1_out)

    def torch_split(dim, outs):
        for o, piece in zip(outs, gate.chunk(2, dim)):
            o.copy_(piece)

    yield ("QKV -> mcore TP shard (7B)", qkv_out.numel() * 2,
           lambda t: qkv_to_mcore(q, k, v, GROUPS, hpg, d, 2, 0, qkv_out, threads=t), torch_qkv,
           lambda: torch.cat([q[:2 * hpg * d], k[:2 * d], v[:2 * d]]).clone())
    yield ("gate/up -> linear_fc1 TP shard (7B)", fc1_out.numel() * 2,
           lambda t: gated_mlp_to_mcore(gate, up, 2, 0, fc1_out, threads=t), torch_fc1,
           lambda: torch.cat([gate.narrow(0, 0, FFN // 2), up.narrow(0, 0, FFN // 2)]))
    yield ("split dim 0 into 2 (gate_proj)", gate.numel() * 2,
           lambda t: split_dim(gate, 0, 2, outs=halves0, threads=t), lambda: torch_split(0, halves0),
           lambda: [p.clone() for p in gate.chunk(2, 0)])
    yield ("split last dim into 2 (gate_proj)", gate.numel() * 2,
           lambda t: split_dim(gate, 1, 2, outs=halves1, threads=t), lambda: torch_split(1, halves1),
           lambda: [p.clone() for p in gate.chunk(2, 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print("| copy | MB | threads | native GB/s | memcpy GB/s | native/memcpy | torch cat/copy_ into out GB/s "
          "| torch new tensors (clone/cat) GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, nbytes, native, torch_out, torch_new in cases():
        src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        t_torch = best_of(torch_out, args.repeat)
        t_new = best_of(torch_new, args.repeat)
        for th in args.threads:
            # alternate native and memcpy within each round, so load changes hit both alike
            native(th), _C.memcpy_threads(dst, src, th)
            t_nat = t_mem = float("inf")
            for _ in range(args.repeat):
                t_nat = min(t_nat, best_of(lambda: native(th), 1))
                t_mem = min(t_mem, best_of(lambda: _C.memcpy_threads(dst, src, th), 1))
            gb = nbytes / 1e9
            print(f"| {name} | {nbytes / 1e6:.0f} | {th} | {gb / t_nat:.2f} | {gb / t_mem:.2f} | "
                  f"{t_mem / t_nat:.0%} | {gb / t_torch:.2f} | {gb / t_new:.2f} |", flush=True)
    src = np.ones(1 << 28, np.uint8)
    dst = np.zeros_like(src)
    t = best_of(lambda: np.copyto(dst, src), args.repeat)
    print(f"numpy copyto 268 MB (1 thread): {0.268 / t:.2f} GB/s; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
