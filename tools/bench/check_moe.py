#!/usr/bin/env python3
"""Qwen3-MoE expert paths against each other and against transformers, on one device.

A random Qwen3-MoE saved by transformers (hidden 256, 2 MoE layers of 16 experts, top-4, expert FFN
128; the router randomised so routing is decisive), converted with `hpctrain export --to_mcore`,
built twice through hpctrain's own path (families mapping -> TransformerConfig -> portable MoE spec):
grouped experts (PortableGroupedMLP: torch grouped_mm) and sequential experts (SequentialMLP). Both
load the same checkpoint. Checked on the same batch:

* grouped vs sequential: logits, the loss and the gradients of the router, the embedding and every
  expert weight (compared through the checkpoint layout both share);
* grouped vs transformers (Qwen3MoeForCausalLM, its per-expert loop ``experts_implementation="eager"``):
  logits and the LM loss.

Tolerances: fp32 on the CPU 1e-4 (relative to the tensor's largest value); bf16 on CUDA 3e-2 for
logits / loss and 6e-2 for gradients, argmax agreement >= 98% (bf16 rounding moves near-ties).
Prints one JSON line {"ok": bool, ...}. Usage: python tools/bench/check_moe.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, num_experts=16, num_experts_per_tok=4,
             moe_intermediate_size=128, norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6,
             router_aux_loss_coef=0.001, max_position_embeddings=4096)


def save_hf(out: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, tie_word_embeddings=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))


def init(device: torch.device) -> None:
    import torch.distributed as dist

    from hpctrain.train import compat, dist as hdist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    compat.apply(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # "cuda" has no index: set_device needs one
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    hdist.init_model_parallel(seed=1234)


def build_mcore(mcore_dir: Path, grouped: bool, dtype, device):
    from megatron.core import dist_checkpointing

    from hpctrain.checkpoint import layout, safe_pickle
    from hpctrain.checkpoint.locate import model_args_from_checkpoint
    from hpctrain.model.build import build_gpt_model

    safe_pickle.install()
    ref = layout.require_latest(mcore_dir)
    args = model_args_from_checkpoint(ref.root)
    model = build_gpt_model(args, params_dtype=dtype, moe_grouped_gemm=grouped,
                            bias_activation_fusion=device.type == "cuda")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ref.path))
    model.load_state_dict(state, strict=False)
    return model.to(device)


def mcore_pass(model, ids, labels, probe):
    """Logits, mean LM loss, and {checkpoint key: grad} after backward of the loss + a probe term."""
    model.train()
    model.zero_grad(set_to_none=True)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = model(ids, pos, attention_mask=None)  # [b, s, V]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    (loss + (logits.float() * probe).mean()).backward()
    return logits.detach().float(), float(loss), expert_grads(model)


def expert_grads(model) -> dict:
    """Grads in the layout both expert modules share: [experts, out, in] per layer and weight."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        layer = name.split(".")[2] if name.startswith("decoder.layers.") else None
        if name.endswith("experts.weight1"):  # GroupedMLP: [hidden, E * 2f] viewed [E, hidden, 2f]
            e = model.config.num_moe_experts
            out[f"{layer}.fc1"] = g.view(e, model.config.hidden_size, -1).transpose(1, 2)
        elif name.endswith("experts.weight2"):  # [E * f, hidden] viewed [E, f, hidden]
            e = model.config.num_moe_experts
            out[f"{layer}.fc2"] = g.view(e, -1, model.config.hidden_size).transpose(1, 2)
        elif ".local_experts." in name:
            idx = int(name.split(".local_experts.")[1].split(".")[0])
            kind = "fc1" if "linear_fc1" in name else "fc2"
            out.setdefault(f"{layer}.{kind}", {})[idx] = g
        else:
            out[name] = g
    for k, v in list(out.items()):
        if isinstance(v, dict):
            out[k] = torch.stack([v[i] for i in sorted(v)])
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def hf_pass(hf_dir: Path, ids, labels, dtype, device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, experts_implementation="eager")
    except TypeError:  # a transformers without experts_implementation: its loop is the only path
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    model = model.to(device).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return logits, float(loss), getattr(model.config, "_experts_implementation", None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tol, gtol, agree_min = (3e-2, 6e-2, 0.98) if cuda else (1e-4, 1e-4, 1.0)
    from hpctrain.checkpoint.export import run as export

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, mc_dir = Path(tmp) / "hf", Path(tmp) / "mc"
        save_hf(hf_dir)
        assert export(["--model", str(hf_dir), "--to_mcore", "true", "--output_dir", str(mc_dir),
                       "--torch_dtype", "bfloat16" if cuda else "float32", "--no_progress"]) == 0
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 256), generator=g).to(device)
        labels = torch.randint(0, SHAPE["vocab_size"], (2, 256), generator=g).to(device)
        probe = torch.randn(2, 256, SHAPE["vocab_size"], generator=g).to(device)
        hf_logits, hf_loss, impl = hf_pass(hf_dir, ids, labels, dtype, device)
        init(device)
        res = {}
        for grouped in (True, False):
            model = build_mcore(mc_dir, grouped, dtype, device)
            res[grouped] = mcore_pass(model, ids, labels, probe)
            del model
    (lg, loss_g, grads_g), (ls, loss_s, grads_s) = res[True], res[False]
    grad_diffs = {k: rel(grads_g[k], grads_s[k]) for k in grads_s}
    out = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), hf_experts_implementation=impl,
               grouped_vs_sequential_logits=rel(lg, ls), grouped_vs_sequential_loss=abs(loss_g - loss_s),
               grouped_vs_sequential_max_grad=max(grad_diffs.values()), grad_keys=len(grad_diffs),
               grouped_vs_hf_logits=rel(lg, hf_logits), grouped_vs_hf_loss=abs(loss_g - hf_loss),
               argmax_vs_hf=float((lg.argmax(-1) == hf_logits.argmax(-1)).float().mean()),
               loss=loss_g, hf_loss=hf_loss)
    worst = max(grad_diffs, key=grad_diffs.get)
    out["worst_grad"] = worst
    out["ok"] = bool(out["grouped_vs_sequential_logits"] < tol and out["grouped_vs_sequential_loss"] < tol
                     and out["grouped_vs_sequential_max_grad"] < gtol and out["grouped_vs_hf_logits"] < tol
                     and out["grouped_vs_hf_loss"] < tol and out["argmax_vs_hf"] >= agree_min
                     and {"0.fc1", "0.fc2", "1.fc1", "1.fc2"} <= set(grad_diffs))
    print(json.dumps(out), flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
