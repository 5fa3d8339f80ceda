"""Numbers the training log reports besides the loss: the parameter norm (log_params_norm), memory
(log_memory_to_tensorboard) and throughput (log_throughput).

params_norm is collective (every rank calls it): the L2 norm of all model parameters, each counted
once, as Megatron-LM's calc_params_l2_norm counts them: a parameter replicated over TP (norms,
row-parallel biases) only on TP rank 0, the tied embedding's copy on the last pipeline stage
(``shared``) not at all; the squares are summed over the model-parallel (TP x PP) group.
"""
from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as tdist


def params_norm(chunks: list) -> float:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    dev = "cuda" if torch.cuda.is_available() and tdist.get_backend() == "nccl" else "cpu"
    # One fp32-accumulated norm per tensor, on its device (no fp32 copy of a bf16 weight), summed in fp64:
    # a single host sync per call.
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for chunk in chunks
             for p in chunk.parameters()
             if not getattr(p, "shared", False) and param_is_not_tensor_parallel_duplicate(p)]
    total = torch.stack(norms).to(dev, torch.float64).pow(2).sum().reshape(1) if norms else \
        torch.zeros(1, dtype=torch.float64, device=dev)
    tdist.all_reduce(total, group=ps.get_model_parallel_group())
    return float(total.sqrt())


def memory_gib() -> dict[str, float]:
    """GPU: peak allocated and reserved (GiB); CPU: this process's peak resident set (GiB)."""
    if torch.cuda.is_available():
        return {"mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.memory_reserved() / 2**30}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem_rss_peak_gib": peak / (2**30 if sys.platform == "darwin" else 2**20)}


def throughput(tokens: int, step_time: float, world: int, flops_per_token: float, peak_tflops: float | None) -> dict:
    """tokens/s and model TFLOP/s per GPU, and MFU when the device's peak is known."""
    tps = tokens / max(step_time, 1e-9) / world
    out = {"tokens_per_s_per_gpu": tps, "tflops_per_gpu": tps * flops_per_token / 1e12}
    if peak_tflops:
        out["mfu"] = out["tflops_per_gpu"] / peak_tflops
    return out
