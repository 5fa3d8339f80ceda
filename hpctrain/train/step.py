"""One training / evaluation step: micro-batches through megatron-core's pipeline schedule.

Loss normalisation: the loss function returns the SUM of per-token losses and the token count
(megatron-core's ``calculate_per_token_loss`` path). The schedule adds up the counts of all
micro-batches, ``finalize_model_grads`` all-reduces that count over DP and divides the grads by it,
so the gradient is that of the per-token mean over the whole global batch (not a mean of
micro-batch means) - the same for any split into micro-batches, DP ranks or packed rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as tdist

IGNORE = -100


class NonFiniteError(RuntimeError):
    """Loss or grad norm is NaN/inf; the message names the iteration."""


@dataclass
class StepResult:
    loss: float            # per-token mean over the global batch
    tokens: int            # trained (loss) tokens in the global batch
    seq_tokens: int        # all token positions processed (this DP rank x DP size)
    grad_norm: float | None
    update_ok: bool
    lr: float
    load_balancing_loss: float | None = None  # MoE models: set by the loop (train/moe_metrics.py)


def pad_microbatches(mbs: list[dict], multiple: int, same_length: bool,
                     row_length: int | None = None) -> list[dict]:
    """Right-pad each micro-batch (labels -100) to a multiple of ``multiple`` and, for pipeline
    parallelism (fixed p2p shapes), all to the same length; ``row_length`` pads every row to that
    length (packed rows on a GPU: one shape, so compiled kernels are built once)."""
    longest = max(b["input_ids"].shape[1] for b in mbs)
    target = max(row_length, longest) if row_length else (longest if same_length else None)
    out = []
    for b in mbs:
        s = b["input_ids"].shape[1]
        t = target if target is not None else s
        t = -(-t // multiple) * multiple
        if t == s:
            out.append(b)
            continue
        pad = t - s
        nb = dict(b)
        nb["input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, pad), value=0)
        nb["labels"] = torch.nn.functional.pad(b["labels"], (0, pad), value=IGNORE)
        last = b["position_ids"][:, -1:]
        nb["position_ids"] = torch.cat([b["position_ids"], last + 1 + torch.arange(pad).expand(
            b["position_ids"].shape[0], pad)], dim=1)
        nb.pop("cu_seqlens", None)  # rebuilt from position_ids when needed
        nb["pad_start"] = s  # the positions added here: a MoE router leaves them out of its aux loss
        nb["packed"] = b.get("packed", "cu_seqlens" in b)
        out.append(nb)
    return out


def _to_device(b: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def segment_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 offsets of the samples in the flattened [b*s] stream: a sample starts where its
    position id is 0 and at every row start (padding appended by pad_microbatches continues the
    row's last sample, with labels -100)."""
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    total = torch.tensor([position_ids.numel()], dtype=idx.dtype)
    return torch.cat([idx, total]).to(torch.int32)


def model_inputs(b: dict, cp_size: int, cp_rank: int) -> tuple[dict, object]:
    """This rank's view of a micro-batch and its PackedSeqParams (None when unpacked).

    Packed rows go to the model as one [1, b*s] `thd` stream: megatron-core's RoPE restarts the
    positions per sample only in that format, and the attention keeps samples apart by segment
    (portable spec: document-causal flex/SDPA masks; TE: its own thd kernels). Under context
    parallel each rank keeps its load-balanced 2 of 2*CP chunks (of every sample when packed).
    """
    from hpctrain.model.portable import pad_segments_for_cp, split_batch_for_cp
    from hpctrain.model.portable.packing import packed_seq_params, to_thd

    if not (b.get("packed") or "cu_seqlens" in b):
        return split_batch_for_cp(b, cp_size, cp_rank), None
    b = dict(b, cu_seqlens=segment_cu_seqlens(b["position_ids"].cpu()))
    b = to_thd(b)
    if cp_size > 1:
        b = pad_segments_for_cp(b, cp_size)
        b = split_batch_for_cp(b, cp_size, cp_rank)
    return b, b["cu_seqlens"]


def forward_step(device, data_iterator, model):
    """megatron-core forward_step_func: returns (output, loss_func)."""
    b = next(data_iterator)
    if "_graph" in b:  # a CUDA-graph slot: device buffers and a static plan (train/cuda_graph.py)
        ids, pos, labels, psp = b["_graph"]
    else:
        ids, pos, labels, psp = _device_inputs(b, device)
    loss_mask = labels != IGNORE
    extra = {"padding_mask": _moe_padding_mask(b, ids, model)} if _is_moe(model) and "_graph" not in b else {}
    # loss_mask: the chunked cross entropy makes its gradients for a mean over these tokens
    out = model(ids, pos, None, labels=labels.masked_fill(~loss_mask, 0), packed_seq_params=psp,
                loss_mask=loss_mask, **extra)
    return out, partial(loss_func, loss_mask)


def _is_moe(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "num_moe_experts", None))


def _moe_padding_mask(b: dict, ids: torch.Tensor, model) -> torch.Tensor:
    """True at the positions pad_microbatches added (for TP/SP divisibility or PP's common length):
    megatron-core's router then leaves them out of the load-balancing loss, so the aux loss (and its
    gradients) do not depend on the layout. A later pipeline stage with sequence parallel gets its
    TP rank's slice (GPTModel only scatters the mask on the first stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    mask = pos >= b.get("pad_start", ids.shape[1])
    inner = unwrap_model(model)
    if not getattr(inner, "pre_process", True) and inner.config.sequence_parallel:
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = mask.shape[1] // tp
        mask = mask[:, r * n:(r + 1) * n]
    return mask.contiguous()


def _device_inputs(batch: dict, device):
    """(input_ids, position_ids, labels, PackedSeqParams or None) of a host micro-batch, on the device."""
    from megatron.core import parallel_state as ps
    from hpctrain.model.portable.attention import _get_plan
    from hpctrain.model.portable.packing import packed_seq_params

    cp_size = ps.get_context_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank() if cp_size > 1 else 0
    b, cu = model_inputs(batch, cp_size, cp_rank)
    b = _to_device(b, device)
    psp = None
    if cu is not None:
        cp_group = ps.get_context_parallel_group() if cp_size > 1 else None
        psp = packed_seq_params(cu, cp_group=cp_group, device=device)
        # The attention's masking plan from the host's offsets: no layer reads them back.
        local = b["input_ids"].shape[1]
        _get_plan(psp.cu_seqlens_q, local * cp_size, local, cp_size, cp_rank, device,
                  host_cu_seqlens=cu.tolist())
    return b["input_ids"], b["position_ids"], b["labels"], psp


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float() * loss_mask.float()
    loss_sum = losses.sum()
    n = loss_mask.sum().to(torch.int)
    # clone: the schedule divides the returned loss in place (it shares storage with a detach()).
    report = torch.stack([loss_sum.detach().clone(), n.detach().float()])
    return loss_sum, n, {"lm loss": report}


def reduce_losses(losses: list[dict]) -> tuple[float, int]:
    """Global per-token mean: sum (loss, tokens) over micro-batches, then over every rank that holds
    a distinct part (last PP stage, TP rank 0; all DP and CP ranks)."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    # CP ranks hold disjoint tokens: each one's (loss, count) is a distinct part of the sum.
    owner = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if owner:
        for d in losses:
            total += d["lm loss"].detach().to("cpu", torch.float64)
    dev = "cuda" if torch.cuda.is_available() and tdist.get_backend() == "nccl" else "cpu"
    total = total.to(dev)
    tdist.all_reduce(total)
    loss_sum, tokens = float(total[0]), int(total[1])
    return (loss_sum / tokens if tokens else float("nan")), tokens


def _run_schedule(chunks, microbatches, device, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.core import parallel_state as ps

    iters = [iter(list(microbatches)) for _ in chunks]
    first = microbatches[0]
    if "_graph" in first:  # CUDA-graph slots are already [1, b*s] streams or [b, s] rows
        b, s = first["_graph"][0].shape
    else:
        b, s = first["input_ids"].shape
    if first.get("packed") or "cu_seqlens" in first:
        # thd: one [1, b*s] stream per micro-batch (see model_inputs); the pipeline's p2p shapes
        # follow it. CP pads every sample to a multiple of 2*CP, so lengths would vary per
        # micro-batch - fixed p2p shapes cannot carry that.
        if ps.get_context_parallel_world_size() > 1 and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("packing with both context parallel and pipeline parallel is not supported: "
                             "set packing = false, context_parallel_size = 1 or pipeline_model_parallel_size = 1")
        b, s = 1, b * s
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, device),
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches), seq_length=s,
        micro_batch_size=b, forward_only=forward_only)


def train_step(chunks, optimizer, scheduler, microbatches, device, iteration: int, pad_multiple: int,
               same_length: bool, row_length: int | None = None, graph=None) -> StepResult:
    """Forward+backward over the global batch's micro-batches, then one optimizer step.
    graph: a train/cuda_graph.StepGraph (the schedule then runs without finalize_model_grads,
    which runs after it here)."""
    microbatches = pad_microbatches(microbatches, pad_multiple, same_length, row_length)
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    if graph is None:
        losses = _run_schedule(chunks, microbatches, device, forward_only=False)
    else:
        from megatron.core.distributed import finalize_model_grads

        losses = graph.run(lambda mbs: _run_schedule(chunks, mbs, device, forward_only=False),
                           lambda n: finalize_model_grads(chunks, n), microbatches, device)
    update_ok, grad_norm, _ = optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    if update_ok:
        scheduler.step(increment=1)
    loss, tokens = reduce_losses(losses)
    seq = sum(b["input_ids"].numel() for b in microbatches)
    from megatron.core import parallel_state as ps
    seq *= ps.get_data_parallel_world_size()
    if not math.isfinite(loss):
        raise NonFiniteError(f"iteration {iteration}: loss is {loss} (non-finite); stopping.")
    if update_ok and grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"iteration {iteration}: grad norm is {grad_norm} (non-finite); stopping.")
    return StepResult(loss, tokens, seq, grad_norm, bool(update_ok), lr)


@torch.no_grad()
def eval_step(chunks, microbatches, device, pad_multiple: int, same_length: bool,
              row_length: int | None = None) -> tuple[float, int]:
    microbatches = pad_microbatches(microbatches, pad_multiple, same_length, row_length)
    for c in chunks:
        c.eval()
    try:
        losses = _run_schedule(chunks, microbatches, device, forward_only=True)
    finally:
        for c in chunks:
            c.train()
    return reduce_losses(losses)
