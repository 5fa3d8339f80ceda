#!/usr/bin/env python3
"""Qwen3-MoE and Qwen3 dense training steps: hpctrain (megatron-core + portable spec) vs transformers.

Shapes (random weights, built from transformers' config classes; layers cut to fit the budget):
  moe    Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, expert FFN 768, 32 q / 4 kv heads, head_dim 128,
         vocab 151936, cut to 4 layers (all MoE)
  dense  Qwen3-1.7B: hidden 2048, FFN 6144, 16 q / 8 kv heads, head_dim 128, vocab 151936, tied
         embeddings, cut to 8 layers
Variants (each one independent: an error or a timeout is recorded and the next one runs):
  ours            hpctrain's model from the HF config (families mapping -> TransformerConfig -> portable
                  spec): MoE with grouped experts (torch grouped_mm) and the alltoall dispatcher; chunked
                  output layer + cross entropy; bf16 params, torch fused AdamW
  ours-sequential MoE only: the same with SequentialMLP (per-expert loop)
  ours+graph      dense only: "ours" with forward + backward captured once as a CUDA graph and replayed
                  (what the trainer's cuda_graph_impl = "local" does; MoE routing changes shapes, so
                  MoE runs without it)
  hf-eager        transformers (sdpa attention), experts_implementation="eager" (its per-expert loop)
  hf              transformers with its default experts implementation (grouped_mm in 5.x)
Same batch for all: micro-batch 4 x 2048 random tokens, one step = forward + backward + AdamW; the MoE
load-balancing loss is on in both (HF: output_router_logits, coefficient 0.001; ours: 0.001).
Reported (one JSON line per variant): median step time, tokens/s, peak memory, MFU on ACTIVE params
(hpctrain.train.logger.flops_per_token: a MoE layer counts its router and top-k experts) over the
datasheet peak and over the bf16 matmul rate measured in the same run, and ours/HF ratios.

  python3 tools/bench/bench_moe.py --out FILE.jsonl [--budget_s 200]
  python3 tools/bench/bench_moe.py --tiny --out /tmp/x.jsonl        # CPU smoke run (fp32, tiny shapes)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16
COMMON = dict(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
              head_dim=128, hidden_act="silu", attention_bias=False)
SHAPES = {
    "moe": dict(COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=32,
                num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                router_aux_loss_coef=0.001),
    "dense": dict(COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, tie_word_embeddings=True),
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
VARIANTS = {"moe": ["ours", "hf-eager", "hf", "ours-sequential"], "dense": ["ours", "hf", "ours+graph"]}
# Run order: the pairs the targets are about first, so a short budget cuts the extras.
ORDER = [("moe", "ours"), ("moe", "hf-eager"), ("dense", "ours"), ("dense", "hf"), ("moe", "hf"),
         ("dense", "ours+graph"),
         ("moe", "ours-sequential")]


class VariantTimeout(Exception):
    pass


def hf_config(kind: str, tiny: bool) -> dict:
    from transformers import Qwen3Config, Qwen3MoeConfig

    shape = dict(SHAPES[kind], **({k: v for k, v in TINY.items() if kind == "moe" or "expert" not in k}
                                  if tiny else {}))
    cls, arch = (Qwen3MoeConfig, "Qwen3MoeForCausalLM") if kind == "moe" else (Qwen3Config, "Qwen3ForCausalLM")
    d = cls(**shape).to_dict()
    d["architectures"] = [arch]
    return d


def setup(tiny: bool):
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not tiny
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29300 + os.getpid() % 1000))
    from hpctrain.train import compat
    from hpctrain.train import dist as hdist

    compat.apply("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    hdist.init_model_parallel(seed=1234)
    return torch.device("cuda", 0) if cuda else torch.device("cpu"), torch.bfloat16 if cuda else torch.float32


def build_ours(hf: dict, device, dtype, grouped: bool):
    from hpctrain.model.build import build_gpt_model, model_args_from_hf
    from hpctrain.model.portable.cross_entropy import chunk_tokens_for, enable_chunked_cross_entropy

    args = model_args_from_hf(hf, where="bench config")
    cuda = device.type == "cuda"
    extra = dict(moe_grouped_gemm=grouped) if args.get("num_experts") else {}
    model = build_gpt_model(args, params_dtype=dtype, use_cpu_initialization=not cuda,
                            bias_activation_fusion=cuda, bias_dropout_fusion=cuda, **extra)
    enable_chunked_cross_entropy(model, chunk_tokens_for(args["padded_vocab_size"]))
    return model.to(device), args


def build_hf(hf: dict, device, dtype, experts: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(attn_implementation="sdpa")
    if experts is not None:
        kw["experts_implementation"] = experts
    cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    cfg.use_cache = False
    with torch.device(device):  # initialise on the GPU (a CPU init of 3B params takes half a minute)
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
        except (TypeError, ValueError):  # a transformers without experts_implementation: it only has its loop
            kw.pop("experts_implementation", None)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    return model.to(device)


def flops_per_token(args: dict, seq: int) -> float:
    """hpctrain's MFU formula (train/logger.py), on the model arguments: active params for MoE."""
    from hpctrain.train.logger import flops_per_token as fpt

    m = SimpleNamespace(hidden_size=args["hidden_size"], num_layers=args["num_layers"],
                        padded_vocab_size=args["padded_vocab_size"], ffn_hidden_size=args["ffn_hidden_size"],
                        num_attention_heads=args["num_attention_heads"], num_query_groups=args["num_query_groups"],
                        kv_channels=args["kv_channels"], swiglu=True)
    moe = SimpleNamespace(num_experts=args.get("num_experts"), moe_layer_freq=json.dumps(args.get("moe_layer_freq", 1)),
                          moe_router_topk=args.get("moe_router_topk"), moe_ffn_hidden_size=args.get("moe_ffn_hidden_size"))
    return fpt(SimpleNamespace(model=m, moe=moe), seq)


def matmul_tflops(device, dtype, n: int = 8192) -> float | None:
    if device.type != "cuda":
        return None
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


def step_fn(variant: str, model, ids, labels):
    if variant.startswith("hf"):
        moe = hasattr(model.config, "num_experts")
        out = model(input_ids=ids, labels=labels, output_router_logits=moe) if moe else model(input_ids=ids,
                                                                                            labels=labels)
        return out.loss
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    tok = model(ids, pos, None, labels=labels)  # per-token loss (the aux loss goes to the gradients)
    return tok.float().mean()


def timed_steps(variant, model, ids, labels, device, warmup: int, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    graph = None
    if variant.endswith("+graph"):
        if device.type != "cuda":
            raise RuntimeError("+graph needs CUDA")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_train import capture_forward_backward  # the same capture as bench_train's +graph

        variant = variant.removesuffix("+graph")
        graph, loss = capture_forward_backward(lambda: step_fn(variant, model, ids, labels), opt)
    times = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if graph is not None:
            graph.replay()  # the grads are rewritten in place: no zero_grad
        else:
            opt.zero_grad(set_to_none=True)
            loss = step_fn(variant, model, ids, labels)
            loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        print(f"[bench_moe]   {variant} step {i}: {times[-1] if i >= warmup else time.perf_counter() - t0:.3f} s "
              f"loss {float(loss):.3f}", flush=True)
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"{variant}: loss is not finite")
    if PROFILE.get("out") and device.type == "cuda" and graph is None:
        profile_step(variant, model, ids, labels, opt)
    return times


PROFILE: dict = {}  # --profile_out: one more step of each eager variant under torch.profiler


def profile_step(variant, model, ids, labels, opt) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.zero_grad(set_to_none=True)
        step_fn(variant, model, ids, labels).backward()
        opt.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=70)
    with open(PROFILE["out"], "a") as f:
        f.write(f"# {variant} (one step)\n{table}\n")


def _alarm(signum, frame):
    raise VariantTimeout()


def run_variant(kind: str, variant: str, hf: dict, a, device, dtype, matmul) -> dict:
    rec = dict(shape=kind, variant=variant, layers=hf["num_hidden_layers"], seq=a.seq, micro_batch=a.micro_batch,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    model = None
    t0 = time.perf_counter()
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(a.variant_timeout_s))
    try:
        from hpctrain.model.build import model_args_from_hf

        args = model_args_from_hf(hf, where="bench config")
        if variant.startswith("ours"):
            model, _ = build_ours(hf, device, dtype, grouped=variant != "ours-sequential")
        else:
            model = build_hf(hf, device, dtype, "eager" if variant == "hf-eager" else None)
            rec["hf_experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        model.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, hf["vocab_size"], (a.micro_batch, a.seq), generator=g).to(device)
        labels = torch.randint(0, hf["vocab_size"], (a.micro_batch, a.seq), generator=g).to(device)
        times = timed_steps(variant, model, ids, labels, device, a.warmup, a.steps)
        step = statistics.median(times)
        tok = a.micro_batch * a.seq / step
        fpt = flops_per_token(args, a.seq)
        rec.update(status="ok", step_ms=round(step * 1e3, 1), tokens_per_s=round(tok),
                   total_params=sum(p.numel() for p in model.parameters()),
                   active_flops_per_token=fpt, mfu_datasheet=round(fpt * tok / (DATASHEET_TFLOPS * 1e12), 4))
        if matmul:
            rec["mfu_measured"] = round(fpt * tok / (matmul * 1e12), 4)
        if device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    except VariantTimeout:
        rec["status"] = f"timeout after {a.variant_timeout_s:.0f} s"
    except torch.OutOfMemoryError:
        rec["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 - one variant failing is a result; the others still run
        rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


def ratios(records: list[dict]) -> list[dict]:
    out = []
    for kind in VARIANTS:
        ok = {r["variant"]: r for r in records if r["shape"] == kind and r.get("status") == "ok"}
        if "ours" not in ok:
            continue
        for ours in ("ours", "ours+graph"):
            for base in ("hf-eager", "hf"):
                if ours in ok and base in ok:
                    out.append(dict(shape=kind, summary=f"{ours}/{base} tokens/s",
                                    ratio=round(ok[ours]["tokens_per_s"] / ok[base]["tokens_per_s"], 2),
                                    target=3.0 if kind == "moe" else 1.3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="append one JSON line per variant (and the ratios) here")
    p.add_argument("--budget_s", type=float, default=200.0, help="total seconds; variants that would not fit are skipped")
    p.add_argument("--variant_timeout_s", type=float, default=80.0)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shapes", default="moe,dense")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, seq 64, fp32")
    p.add_argument("--profile_out", help="append a torch.profiler table of one more step per eager variant here")
    a = p.parse_args(argv)
    PROFILE["out"] = a.profile_out
    if a.tiny:
        a.seq, a.micro_batch, a.steps, a.warmup = 64, 2, 2, 1
    start = time.perf_counter()
    device, dtype = setup(a.tiny)
    matmul = matmul_tflops(device, dtype)
    records = []
    shapes = a.shapes.split(",")
    configs = {kind: hf_config(kind, a.tiny) for kind in shapes}
    for kind, variant in ORDER:
        if kind not in shapes:
            continue
        left = a.budget_s - (time.perf_counter() - start)
        if variant.endswith("+graph") and device.type != "cuda":
            rec = dict(shape=kind, variant=variant, status="skipped (CUDA graphs need CUDA)")
        elif left < min(a.variant_timeout_s, 20.0):
            rec = dict(shape=kind, variant=variant, status=f"skipped (budget: {left:.0f} s left)")
        else:
            a.variant_timeout_s = min(a.variant_timeout_s, left)
            print(f"[bench_moe] {kind} {variant} ({left:.0f} s left)", flush=True)
            rec = run_variant(kind, variant, configs[kind], a, device, dtype, matmul)
        if matmul:
            rec["matmul_tflops"] = round(matmul, 1)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    with open(a.out, "a") as f:
        for r in ratios(records):
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0 if any(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
