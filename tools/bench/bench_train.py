#!/usr/bin/env python3
"""Training-step benchmark: megatron-core + portable spec vs megatron-core local spec vs plain HF.

Runs standalone under torchrun (one process per GPU), random weights from real Qwen2.5 shapes,
random tokens, bf16, AdamW (torch fused) for every variant so only the model path differs:

  portable        megatron-core GPTModel, portable spec (SDPA / flex_attention), packed samples (thd),
                  chunked fused output layer + cross entropy; TP / SP / CP as asked
  portable-dense  the same on plain causal rows (no packing: SDPA is_causal)
  local           megatron-core's local spec (unfused attention), plain causal rows; TP/SP, no CP
  hf              transformers Qwen2ForCausalLM, attn_implementation="sdpa", one GPU only
  hf+liger        the same with liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear cross entropy
  <variant>+compile  the same with each transformer layer torch.compile'd (e.g. portable-dense+compile)
  <variant>+graph    forward + backward captured once as one CUDA graph and replayed every step
                     (static batch; the optimizer step runs outside the graph): what removing the
                     host / launch overhead is worth. A measurement, not yet a trainer option.

Reported per variant (rank 0, one JSON line): median step time, tokens/s per GPU, peak memory,
MFU over the bf16 matmul rate measured on the same GPU in the same run and over the datasheet
peak (989 TFLOP/s dense bf16, H100 SXM). Model FLOPs per token:
  6 * non-embedding params + 6 * hidden * vocab + 6 * layers * hidden * seq
(the last term is causal attention counted at half; with packing it overstates attention work).

  torchrun --nproc_per_node 1 tools/bench/bench_train.py --model 0.5b --seq 2048 --micro-batch 4
  torchrun --nproc_per_node 2 tools/bench/bench_train.py --model 7b --tp 2 --sp --seq 2048
  python tools/bench/bench_train.py --tiny            # CPU smoke run (gloo, fp32, tiny shapes)
  python tools/bench/bench_train.py --summarize results.jsonl   # markdown table
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16
CONFIG_DIR = os.path.join(ROOT, "hpctrain", "assets", "configs")
SHAPES = {
    # Qwen2.5-1.5B's published config (no file bundled): hidden 1536, 28 layers, 12/2 heads.
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                 rope_theta=1e6, rms_norm_eps=1e-6),
}
KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps")


def model_shape(name: str) -> dict:
    if name in SHAPES:
        return dict(SHAPES[name])
    path = os.path.join(CONFIG_DIR, f"qwen2.5-{name}-instruct.config.json")
    if not os.path.exists(path):
        raise SystemExit(f"unknown model {name!r}: use 0.5b, 7b (from {CONFIG_DIR}), 1.5b or tiny")
    with open(path) as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in KEYS}


def flops_per_token(shape: dict, seq: int) -> float:
    h, L, f, v = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], \
        shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * h + 2 * h * kv + (h + 2 * kv) + h * h + 3 * h * f + 2 * h  # qkv(+bias), o, mlp, norms
    non_embedding = L * per_layer + h
    return 6 * non_embedding + 6 * h * v + 6 * L * h * seq


# ------------------------------------------------------------------ environment

def setup(args):
    cuda = torch.cuda.is_available() and not args.tiny
    if "RANK" not in os.environ:  # plain `python bench_train.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ["LOCAL_RANK"])
    from hpctrain.train import compat
    compat.apply("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if world % (args.tp * args.cp):
        raise SystemExit(f"world size {world} is not a multiple of tp({args.tp}) * cp({args.cp})")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    ps.initialize_model_parallel(args.tp, 1, context_parallel_size=args.cp)
    model_parallel_cuda_manual_seed(1234)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    return device, dtype


def matmul_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ data

def make_batch(args, shape, device, packed: bool) -> dict:
    """Identical on every rank (fixed seed). Packed: random sample lengths, multiples of 64."""
    g = torch.Generator().manual_seed(0)
    mb, s, v = args.micro_batch, args.seq, shape["vocab_size"]
    ids = torch.randint(0, v, (mb, s), generator=g)
    labels = torch.randint(0, v, (mb, s), generator=g)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(s).repeat(mb, 1)}
    if packed:
        unit = max(64, 2 * args.cp)
        cu, pos = [0], []
        for _ in range(mb):
            left = s
            lo = max(1, s // (8 * unit))
            hi = max(lo + 1, s // (2 * unit) + 1)
            while left > 0:
                n = min(left, unit * int(torch.randint(lo, hi, (1,), generator=g)))
                cu.append(cu[-1] + n)
                pos.append(torch.arange(n))
                left -= n
        batch["position_ids"] = torch.cat(pos).view(mb, s)
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def local_batch(batch, args, device, packed: bool):
    from megatron.core import parallel_state as ps
    from hpctrain.model.portable import split_batch_for_cp
    from hpctrain.model.portable.packing import packed_seq_params, to_thd
    if packed:
        batch = to_thd(batch)
    batch = split_batch_for_cp(batch, args.cp, ps.get_context_parallel_rank())
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    psp = packed_seq_params(batch["cu_seqlens"]) if packed else None
    return batch, psp


# ------------------------------------------------------------------ models

def build_mcore(shape, args, variant, device, dtype):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from hpctrain.model.portable import get_portable_block_spec
    from hpctrain.model.portable.cross_entropy import chunk_tokens_for, enable_chunked_cross_entropy
    h = shape["hidden_size"]
    recompute = {} if args.recompute == "none" else (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if args.recompute == "full" else
        dict(recompute_granularity="selective", recompute_modules=["core_attn"]))
    cfg = TransformerConfig(
        num_layers=shape["num_hidden_layers"], hidden_size=h,
        num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape["num_key_value_heads"], ffn_hidden_size=shape["intermediate_size"],
        kv_channels=h // shape["num_attention_heads"], normalization="RMSNorm",
        layernorm_epsilon=shape["rms_norm_eps"], gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
        bias_activation_fusion=args.fusions, bias_dropout_fusion=args.fusions,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        use_cpu_initialization=device.type == "cpu", tensor_model_parallel_size=args.tp,
        context_parallel_size=args.cp, sequence_parallel=args.sp and args.tp > 1,
        cross_entropy_loss_fusion=False, **recompute)
    spec = (get_portable_block_spec(cfg) if variant.startswith("portable")
            else get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=shape["vocab_size"],
                     max_sequence_length=max(args.seq, 4096), position_embedding_type="rope",
                     rotary_base=int(shape["rope_theta"]),
                     share_embeddings_and_output_weights=shape["tie_word_embeddings"]).to(device)
    if variant.startswith("portable") and args.chunked_ce:
        enable_chunked_cross_entropy(model, chunk_tokens_for(shape["vocab_size"] // args.tp))
    return model


def build_hf(shape, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, use_cache=False,
                      attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype)


def _grad_sync(model, args):
    """What megatron's DDP + finalize_model_grads do: sum grads over DP x CP, SP norms over TP."""
    from megatron.core import parallel_state as ps
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    groups = []
    if dist.get_world_size() // args.tp > 1:
        groups.append((ps.get_data_parallel_group(with_context_parallel=True), None))
    if args.sp and args.tp > 1:
        groups.append((ps.get_tensor_model_parallel_group(), "sequence_parallel"))
    for group, attr in groups:
        grads = [p.grad for p in model.parameters()
                 if p.grad is not None and (attr is None or getattr(p, attr, False))]
        if grads:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)


# ------------------------------------------------------------------ one variant

def compile_layers(model):
    """torch.compile each transformer layer in place (same parameters and checkpoint keys): fuses
    the norm, RoPE, bias, SwiGLU and residual elementwise kernels that megatron-core runs one by one
    without Transformer Engine, and cuts the per-layer Python/launch overhead."""
    for layer in model.decoder.layers:
        layer.compile(dynamic=False)
    if getattr(model.decoder, "final_layernorm", None) is not None:
        model.decoder.final_layernorm.compile(dynamic=False)


def profile_steps(variant, model, opt, full, args, device, packed, path):
    """Two profiled steps: top kernels/ops by device time, and device busy time vs wall time (a
    step whose kernels keep the GPU busy for much less than its wall time is launch/CPU bound)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        a2 = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 2})
        wall = sum(_timed_steps(variant, model, opt, full, a2, device, packed))
    events = prof.key_averages()
    # Kernels appear twice in key_averages (as their own rows and inside the op that launched
    # them): count the op rows only, as the table's "Self CUDA time total" footer does.
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    busy = sum(e.self_device_time_total for e in ops) / 1e6 if device.type == "cuda" else 0.0
    with open(path, "w") as f:
        f.write(f"# {variant}: 2 steps, wall {wall * 1e3:.1f} ms, GPU kernels busy {busy * 1e3:.1f} ms "
                f"({busy / wall:.0%} of wall)\n")
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        f.write(events.table(sort_by=sort, row_limit=35, max_name_column_width=70))
    return round(busy / wall, 3) if wall else None


def apply_liger(model) -> None:
    """HF + Liger (liger-kernel's Triton RMSNorm, RoPE, SwiGLU and fused linear cross entropy): the
    baseline an HF user reaches for when memory or speed matters."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)


def run_variant(variant, shape, args, device, dtype, peak_tflops):
    graphed = variant.endswith("+graph")
    variant = variant.removesuffix("+graph")
    liger = variant == "hf+liger"
    variant = variant.removesuffix("+liger")
    compiled = variant.endswith("+compile")
    variant = variant.removesuffix("+compile")
    packed = variant == "portable" and args.packing
    result = dict(variant="hf+liger" if liger else variant, model=args.model, seq=args.seq, micro_batch=args.micro_batch,
                  attn_backend=args.attn_backend, chunked_ce=args.chunked_ce,
                  tp=args.tp, cp=args.cp, sp=args.sp and args.tp > 1, packed=packed,
                  recompute=args.recompute, world=dist.get_world_size(), device=_device_name(device),
                  compiled=compiled, cuda_graph=graphed, liger=liger)
    if graphed and (device.type != "cuda" or dist.get_world_size() > 1):
        return dict(result, status="skipped (+graph: one CUDA GPU only)")
    if variant == "hf" and dist.get_world_size() > 1:
        return dict(result, status="skipped (hf baseline runs on one GPU)")
    if variant == "local" and args.cp > 1:
        return dict(result, status="skipped (local spec has no context parallel)")
    model = opt = None
    try:
        model = build_hf(shape, device, dtype) if variant == "hf" else \
            build_mcore(shape, args, variant, device, dtype)
        if liger:
            apply_liger(model)
        model.train()
        if compiled:
            if variant == "hf":
                for layer in model.model.layers:
                    layer.compile(dynamic=False)
            else:
                compile_layers(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        full = make_batch(args, shape, device, packed)
        times = _timed_steps(variant, model, opt, full, args, device, packed, graphed)
        if device.type == "cuda":
            result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        step = statistics.median(times)
        tok_gpu = args.micro_batch * args.seq / step / (args.tp * args.cp)
        fpt = flops_per_token(shape, args.seq)
        result.update(status="ok", step_ms=round(step * 1e3, 1), tokens_per_s_per_gpu=round(tok_gpu),
                      mfu_measured=round(fpt * tok_gpu / (peak_tflops * 1e12), 4),
                      mfu_datasheet=round(fpt * tok_gpu / (DATASHEET_TFLOPS * 1e12), 4),
                      params=sum(p.numel() for p in model.parameters()))
        if args.profile_dir and dist.get_rank() == 0:
            os.makedirs(args.profile_dir, exist_ok=True)
            name = f"profile-{args.model}-{args.seq}-{variant}{'-compiled' if compiled else ''}.txt"
            if not graphed:
                result["gpu_busy_fraction"] = profile_steps(variant, model, opt, full, args, device, packed,
                                                            os.path.join(args.profile_dir, name))
    except torch.OutOfMemoryError:
        result["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a graph capture that fails is a result, not the end of the run
        if not graphed:
            raise
        result["status"] = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:240]}"
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _loss_fn(variant, model, batch, psp, n_tokens):
    if variant == "hf":
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    tok = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=psp)
    return (tok * (batch["labels"] != -100)).sum() / n_tokens


def capture_forward_backward(loss_fn, opt, warmup: int = 3):
    """One CUDA graph of forward + backward (PyTorch's whole-network capture recipe): warm up on a
    side stream (autotuning, lazy inits, cached RoPE tables happen outside the capture), then
    capture with the grads unset so backward allocates them in the graph's pool; every replay
    rewrites those same grad tensors, which the optimizer then reads."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn()
        loss.backward()
    return graph, loss


def _timed_steps(variant, model, opt, full, args, device, packed, graphed=False):
    if variant == "hf":
        batch = {k: v.to(device) for k, v in full.items() if k in ("input_ids", "labels")}
        psp, n_tokens = None, None
    else:
        batch, psp = local_batch(full, args, device, packed)
        n_tokens = int((full["labels"] != -100).sum())
    graph = None
    if graphed:
        graph, loss = capture_forward_backward(lambda: _loss_fn(variant, model, batch, psp, n_tokens), opt)
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        if graph is not None:
            graph.replay()  # grads are overwritten in place: no zero_grad (it would drop them)
        else:
            opt.zero_grad(set_to_none=True)
            loss = _loss_fn(variant, model, batch, psp, n_tokens)
            loss.backward()
        if variant != "hf":
            _grad_sync(model, args)
        opt.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"{variant}: loss is not finite")
    return times


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------ summary

def summarize(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    head = ("| model | seq | mb | TP | CP | SP | variant | status | step ms | tok/s/GPU | "
            "peak GiB | MFU (measured) | MFU (989) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("kind") == "attention_check":
            continue
        out.append("| {model} | {seq} | {micro_batch} | {tp} | {cp} | {sp} | {variant} | {status} | "
                   "{step} | {tok} | {mem} | {m1} | {m2} |".format(
                       **{**r, "variant": r["variant"] + ("+compile" if r.get("compiled") else "")
                          + ("+graph" if r.get("cuda_graph") else "")},
                       step=r.get("step_ms", ""), tok=r.get("tokens_per_s_per_gpu", ""),
                       mem=r.get("peak_mem_gib", ""),
                       m1=f"{r['mfu_measured']:.1%}" if "mfu_measured" in r else "",
                       m2=f"{r['mfu_datasheet']:.1%}" if "mfu_datasheet" in r else ""))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.5b", help="0.5b | 1.5b | 7b | tiny")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel (with tp > 1)")
    p.add_argument("--variants", default="portable,portable-dense,local,hf")
    p.add_argument("--no-packing", dest="packing", action="store_false")
    p.add_argument("--no-chunked-ce", dest="chunked_ce", action="store_false")
    p.add_argument("--no-fusions", dest="fusions", action="store_false",
                   help="turn off megatron's torch.compile'd bias-swiglu / bias-dropout-add fusions")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"],
                   help="portable attention kernel for packed samples (auto: flex on CUDA)")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--profile-dir", default=None,
                   help="also profile 2 steps of each variant (rank 0) and write the top kernels here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, seq 128, mb 2")
    p.add_argument("--summarize", metavar="JSONL", help="print a markdown table of results and exit")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.tiny:
        args.model, args.seq, args.micro_batch, args.steps, args.warmup = "tiny", 128, 2, 2, 1
        args.matmul_size = 256
    shape = model_shape(args.model)
    device, dtype = setup(args)
    from hpctrain.model.portable import PortableAttention
    PortableAttention.backend = args.attn_backend
    peak = matmul_tflops(device, dtype, args.matmul_size)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"[bench] {_device_name(device)}: measured matmul {peak:.1f} TFLOP/s "
              f"({dtype}, n={args.matmul_size})", flush=True)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        result = run_variant(variant, shape, args, device, dtype, peak)
        result["matmul_tflops"] = round(peak, 1)
        if rank0:
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
