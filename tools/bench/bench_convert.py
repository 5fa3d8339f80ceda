"""Benchmark: HF -> mcore conversion and offline reshard of a 7B-shaped checkpoint, next to a plain
disk copy of the same bytes, with peak RSS of each step (measured in a child process).

    python tools/bench/bench_convert.py --workdir /tmp/bench_convert [--num_layers 28] [--keep]

Random bf16 weights with the shapes of hpctrain/assets/configs/qwen2.5-7b-instruct.config.json
(--num_layers N keeps every tensor shape and cuts the layer count: peak RSS of a streaming
converter depends on the largest tensor, not the number of layers).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hpctrain" / "assets" / "configs" / "qwen2.5-7b-instruct.config.json"


def make_model(out: Path, num_layers: int) -> int:
    import torch

    from hpctrain.checkpoint.hf_io import write_safetensors_shards

    cfg = json.loads(CONFIG.read_text())
    cfg["num_hidden_layers"] = num_layers
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(0)

    def tensors():
        def r(*s):
            return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
        yield "model.embed_tokens.weight", r(v, h)
        for i in range(num_layers):
            p = f"model.layers.{i}."
            for n, s in [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
                         ("self_attn.q_proj.weight", (h, h)), ("self_attn.q_proj.bias", (h,)),
                         ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
                         ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
                         ("self_attn.o_proj.weight", (h, h)), ("mlp.gate_proj.weight", (f, h)),
                         ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f))]:
                yield p + n, r(*s)
        yield "model.norm.weight", r(h)
        yield "lm_head.weight", r(v, h)

    out.mkdir(parents=True)
    write_safetensors_shards(out, tensors(), max_shard_bytes=4 * 2**30)
    (out / "config.json").write_text(json.dumps(cfg))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: peak RSS not above an earlier child's; run steps separately", file=sys.stderr)
    return wall, peak / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/bench_convert")
    ap.add_argument("--num_layers", type=int, default=28)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--step", choices=("all", "copy", "convert", "reshard"), default="all")
    a = ap.parse_args()
    w = Path(a.workdir)
    hf, mc, rs, cp = w / "hf", w / "mc", w / "rs", w / "copy"
    if a.step in ("all", "copy"):
        shutil.rmtree(w, ignore_errors=True)
        t = time.perf_counter()
        nbytes = make_model(hf, a.num_layers)
        print(f"made {nbytes / 2**30:.2f} GiB of random bf16 weights in {time.perf_counter() - t:.0f} s")
        wall, rss = timed(["cp", "-r", str(hf), str(cp)])
        print(f"RESULT copy {nbytes / 2**30:.2f} GiB: {wall:.1f} s, peak RSS {rss:.2f} GiB")
        shutil.rmtree(cp)
    py = sys.executable
    if a.step in ("all", "convert"):
        wall, rss = timed([py, "-m", "hpctrain.cli", "export", "--model", str(hf), "--to_mcore", "true",
                           "--output_dir", str(mc), "--overwrite", "true", "--no_progress"])
        print(f"RESULT hf->mcore: {wall:.1f} s, peak RSS {rss:.2f} GiB")
    if a.step in ("all", "reshard"):
        wall, rss = timed([py, "-m", "hpctrain.cli", "reshard", str(mc), "--tp", "4", "--pp", "2",
                           "--out", str(rs), "--overwrite", "--no_progress"])
        print(f"RESULT reshard (torch_dist, to TP4/PP2, verified): {wall:.1f} s, peak RSS {rss:.2f} GiB")
    if not a.keep and a.step == "all":
        shutil.rmtree(w, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
