#!/usr/bin/env python3
"""What one transformer layer keeps for its backward, counted tensor by tensor (CPU, no GPU needed).

Builds the trainer's own GPTModel (train/model_setup.py: the portable spec, the trainer's recompute
and fusion settings) for a real shape cut to 2 layers, runs one forward in bf16 and records every
tensor autograd saves for the backward while layer 2 runs (``torch.autograd.graph.saved_tensors_hooks``,
plus what megatron's recompute helpers stash), deduplicated by storage and excluding parameters.
The core attention is accounted as the memory-efficient GPU kernels (flash / cuDNN / flex) keep
it: its q, k, v inputs, its output and the fp32 log-sum-exp; the CPU's math kernel (which would
also keep the s x s scores) is not what a GPU run keeps.

Reported in units of s*b*h bytes (Megatron's selective-recompute formula is 34 of them per layer,
Korthikanti et al. 2022, for a GeLU MLP of 4h; SwiGLU with a wider MLP needs more), with the
largest saved tensors named.

  python tools/bench/act_memory.py --model 7b --seq 256
  python tools/bench/act_memory.py --model 7b --seq 256 --recompute_modules core_attn mlp_act
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
CONFIG_DIR = os.path.join(ROOT, "hpctrain", "assets", "configs")


class SavedBytes:
    """Unique storages saved for backward while ``active``; parameters excluded."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.active = False
        self.seen: dict[int, tuple[int, str]] = {}
        self.where = "?"

    def add(self, t: torch.Tensor, what: str | None = None) -> None:
        if not self.active or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self.param_ptrs or ptr in self.seen:
            return
        # The storage itself, sized at the end: recompute helpers free storages after the fact.
        self.seen[ptr] = (st, f"{what or self.where}: {tuple(t.shape)} {t.dtype}")

    def sizes(self):
        return [(st if isinstance(st, int) else st.nbytes(), what) for st, what in self.seen.values()]

    def pack(self, t):
        self.add(t)
        return t


def _layer_hooks(model, counter: SavedBytes, layer_index: int):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    target = layers[layer_index]

    def on(_m, _a):
        counter.active = True

    def off(_m, _a, _o):
        counter.active = False

    target.register_forward_pre_hook(on)
    target.register_forward_hook(off)
    for name, mod in target.named_modules():
        mod.register_forward_pre_hook(lambda m, a, n=name: setattr(counter, "where", n or "layer"))
    return target


def _attention_as_gpu_kernels(model, counter: SavedBytes):
    """Count the core attention as flash/flex keep it (q, k, v, out, lse), not the CPU math kernel,
    and skip its recompute as the portable spec does on CUDA (self_attention.py)."""
    from hpctrain.model.portable import attention as A
    from hpctrain.model.portable.self_attention import PortableSelfAttention

    for m in model.modules():
        if isinstance(m, PortableSelfAttention):
            m._asked_core_attn_recompute = m.checkpoint_core_attention = False

    original = A.portable_attention

    def counted(query, key, value, **kw):
        was = counter.active
        if was:
            for n, t in (("q", query), ("k", key), ("v", value)):
                counter.add(t, f"core_attention.{n}")
        counter.active = False
        try:
            out = original(query, key, value, **kw)
        finally:
            counter.active = was
        if was:
            counter.add(out, "core_attention.out")
            heads, tokens = query.shape[-2], query.numel() // (query.shape[-1] * query.shape[-2])
            counter.seen[-len(counter.seen) - 1] = (heads * tokens * 4, f"core_attention.lse: ({heads}, {tokens}) fp32")
        return out

    A.portable_attention = counted


def build(args):
    from hpctrain.config import load_config
    from hpctrain.train import compat, model_setup, model_source

    with open(os.path.join(CONFIG_DIR, f"qwen2.5-{args.model}-instruct.config.json")) as f:
        hf = json.load(f)
    flags = ["--num_layers", "2", "--hidden_size", str(hf["hidden_size"]),
             "--ffn_hidden_size", str(hf["intermediate_size"]),
             "--num_attention_heads", str(hf["num_attention_heads"]),
             "--num_query_groups", str(hf["num_key_value_heads"]), "--padded_vocab_size", "1024",
             "--max_position_embeddings", "4096", "--untie_embeddings_and_output_weights", "true",
             "--add_qkv_bias", "true", "--rotary_base", str(hf["rope_theta"]),
             "--norm_epsilon", str(hf["rms_norm_eps"]), "--bf16", "true",
             "--recompute_granularity", args.recompute_granularity,
             "--cross_entropy_loss_fusion", "true"]
    if args.recompute_granularity == "selective":
        flags += ["--recompute_modules", *args.recompute_modules]
    cfg = load_config(None, flags, mode="sft")
    compat.apply("cpu")
    from tests.portable.portable_tiny import init_single_process  # one-rank gloo + parallel state
    init_single_process()
    model_source.fill_model_fields(cfg)  # fallbacks for the fields not set above
    tcfg = model_setup.transformer_config(cfg, "cpu")
    chunks = model_setup.build_model_chunks(cfg, tcfg)
    return cfg, chunks[0].to(torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", help="Qwen2.5 shape from hpctrain/assets/configs (0.5b, 7b)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--packed", action="store_true", help="two samples per row (thd stream)")
    ap.add_argument("--recompute_granularity", default="selective", choices=("selective", "full", "none"))
    ap.add_argument("--recompute_modules", nargs="*", default=["core_attn"])
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--tensors", action="store_true", help="also list the largest saved tensors")
    args = ap.parse_args(argv)
    if args.recompute_granularity == "none":
        args.recompute_granularity = None
    cfg, model = build(args)
    model.train()
    counter = SavedBytes(list(model.parameters()))
    _attention_as_gpu_kernels(model, counter)
    _layer_hooks(model, counter, 1)
    from hpctrain.train.step import model_inputs, segment_cu_seqlens  # noqa: F401  (the trainer's batch path)
    from hpctrain.model.portable.packing import packed_seq_params

    b, s = args.micro_batch, args.seq
    ids = torch.randint(0, 1000, (b, s))
    pos = torch.arange(s).repeat(b, 1)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    if args.packed:
        batch["position_ids"] = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).repeat(b, 1)
        batch["packed"] = True
    mb, cu = model_inputs(batch, 1, 0)
    psp = packed_seq_params(cu) if cu is not None else None
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = model(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"], packed_seq_params=psp)
    h = model.config.hidden_size
    unit = b * s * h
    sizes = counter.sizes()
    total = sum(n for n, _ in sizes)
    by_kind = defaultdict(int)
    for n, what in sizes:
        by_kind[what.split(":")[0]] += n
    print(f"{args.model}: hidden {h}, {b}x{s} tokens, recompute {args.recompute_granularity} "
          f"{args.recompute_modules if args.recompute_granularity == 'selective' else ''}")
    print(f"saved by layer 2: {total / 2**20:.1f} MiB = {total / unit:.2f} s*b*h bytes "
          f"({total / unit / 34:.2f}x Megatron's 34)")
    for what, n in sorted(by_kind.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {n / unit:6.2f}  {what}")
    if args.tensors:
        for n, what in sorted(sizes, key=lambda v: -v[0])[: args.top]:
            print(f"  {n / unit:6.2f}  {what}")
    loss.sum().backward()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
