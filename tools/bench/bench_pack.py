"""Benchmark sequence packing: hpctrain native BFD vs its Python twin vs binpacking.to_constant_volume.

Lengths are realistic: every row of the bundled alpaca-gpt4 (en, zh) and self-cognition data is
rendered with the Qwen2.5 chat template, tokenized with the Qwen2.5 tokenizer, and the lengths are
resampled (with replacement, fixed seed) to each size. All three run in the same process, one
after the other, single-threaded. Slow baselines are skipped above --twin-max / --binpacking-max
(they are quadratic or pure Python; the skip is printed).

    python tools/bench/bench_pack.py [--sizes 10000 100000 1000000 10000000] [--capacities 2048 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from hpctrain.native import fill_ratio, pack_sequences

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "hpctrain" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
SYSTEM = "You are a helpful assistant."


def chat(query: str, response: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n"
            f"<|im_start|>assistant\n{response}<|im_end|>\n")


def real_lengths() -> np.ndarray:
    """Token counts of every bundled training row (cached next to the tokenizer-free path in /tmp)."""
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "hpctrain_bench_lengths.npy"
    if cache.exists():
        return np.load(cache)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    texts = []
    for name in ("alpaca_gpt4_en.jsonl", "alpaca_gpt4_zh.jsonl", "self_cognition.jsonl"):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "instruction" in row:
                query = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
                texts.append(chat(query, row["output"]))
            else:
                texts.append(chat(row["query"], row["response"].replace("{{NAME}}", "swift-robot")
                                  .replace("{{AUTHOR}}", "swift")))
    lengths = np.asarray([len(ids) for ids in tok(texts)["input_ids"]], dtype=np.int64)
    np.save(cache, lengths)
    return lengths


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_binpacking(lengths: np.ndarray, capacity: int):
    import binpacking
    items = list(enumerate(lengths.tolist()))  # the (index, length) form ms-swift passes
    bins = binpacking.to_constant_volume(items, capacity, weight_pos=1)
    return len(bins)


def bench(sizes, capacities, twin_max, binpacking_max, seed=0):
    base = real_lengths()
    print(f"real rows: {len(base)}, tokens/row mean {base.mean():.0f}, median {np.median(base):.0f}, "
          f"max {base.max()}")
    rng = np.random.default_rng(seed)
    print("| samples | capacity | native s | twin s | binpacking s | native bins | fill | "
          "binpacking bins | speedup vs binpacking |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        lengths = rng.choice(base, size=n)
        for cap in capacities:
            repeat = 3 if n <= 1_000_000 else 1
            t_nat, (offsets, _) = timed(lambda: pack_sequences(lengths, cap, truncate=True), repeat)
            fill = fill_ratio(lengths, offsets, cap)
            t_twin = "skipped"
            if n <= twin_max:
                t, res = timed(lambda: pack_sequences(lengths, cap, truncate=True, impl="python"), 1)
                assert np.array_equal(res[1], pack_sequences(lengths, cap, truncate=True)[1])
                t_twin = f"{t:.3f}"
            t_bp, bp_bins, speed = "skipped", "-", "-"
            if n <= binpacking_max:
                t, bp_bins = timed(lambda: run_binpacking(np.minimum(lengths, cap), cap), 1)
                t_bp, speed = f"{t:.2f}", f"{t / t_nat:.0f}x"
            print(f"| {n:,} | {cap} | {t_nat:.4f} | {t_twin} | {t_bp} | {len(offsets) - 1:,} | "
                  f"{fill:.4%} | {bp_bins} | {speed} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--capacities", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--twin-max", type=int, default=1_000_000)
    ap.add_argument("--binpacking-max", type=int, default=100_000)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()}")
    bench(args.sizes, args.capacities, args.twin_max, args.binpacking_max)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
