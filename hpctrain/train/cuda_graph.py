"""Whole-step CUDA graphs: ``cuda_graph_impl = "local"``, ``cuda_graph_scope = "full_iteration"``.

Why: without Transformer Engine, megatron-core runs each layer as dozens of small kernels launched
from Python, plus a Python backward for every TP linear. On a small model the GPU then waits for the
host (the 0.5B shape on one H200 kept the GPU busy ~60% of a step; docs/benchmarks.md). Capturing
the forward and backward of all micro-batches of a step once and replaying it takes the host out.

A replay re-runs the captured kernels on the same memory, so it is the same step on new data only if:

* every micro-batch has the same shapes (rows padded to one length: the loop's row_length) and its
  data sits in the same device buffers - each micro-batch gets a *slot* (input ids, labels,
  positions; for packed rows a ``StaticPlan`` holding the sample ids, positions and the flex
  BlockMask the attention reads), refilled before every replay;
* parameters and megatron-core's grad buffers keep their addresses (the optimizer updates them in
  place; ``zero_grad_buffer`` is a memset outside the graph);
* nothing inside reads device values on the host or talks to another process: the schedule runs
  with ``finalize_model_grads`` taken out (its DP all-reduce and the division by the token count
  run eagerly after the replay, on the token count the graph computed);
* no random numbers, no hooks that free and refill memory (config/validate.py refuses dropout,
  fp16, recompute other than selective core_attn, model parallelism).

The first ``warmup`` steps run eagerly on the same stream (compilation, autotuning, lazy state),
the next is captured, and every step from then on is refill + replay + finalize.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def enabled(cfg) -> bool:
    return cfg.train.cuda_graph_impl == "local"


def start(device: torch.device) -> torch.cuda.Stream:
    """Call before the model and megatron's DDP are built: make a side stream current. Autograd
    runs a leaf's gradient accumulation on the stream the leaf was made on; on the legacy default
    stream that would join the capture stream and invalidate the capture."""
    if device.type != "cuda":
        from hpctrain.config import ConfigError

        raise ConfigError("train.cuda_graph_impl = 'local' needs a CUDA device (this run is on the "
                          "CPU): set --cuda_graph_impl none")
    stream = torch.cuda.Stream(device)
    torch.cuda.set_stream(stream)
    return stream


class _Slot:
    """Device buffers of one micro-batch position in the captured step."""

    def __init__(self, mb: dict, device: torch.device):
        from hpctrain.model.portable.attention import StaticPlan
        from hpctrain.model.portable.packing import packed_seq_params

        b, s = mb["input_ids"].shape
        self.packed = bool(mb.get("packed") or "cu_seqlens" in mb)
        shape = (1, b * s) if self.packed else (b, s)
        self.tensors = {k: torch.zeros(shape, dtype=torch.long, device=device)
                        for k in ("input_ids", "labels", "position_ids")}
        self.plan = StaticPlan(b * s, device) if self.packed else None
        # max_seqlen = the whole stream: the rotary table then has one length in every replay.
        self.psp = packed_seq_params(torch.tensor([0, b * s]), device=device) if self.packed else None
        if self.psp is not None:
            self.psp.cu_seqlens_q = self.psp.cu_seqlens_kv = self.plan.key

    def fill(self, mb: dict) -> None:
        from hpctrain.model.portable.attention import _h2d

        flat = {k: mb[k].reshape(self.tensors[k].shape) for k in self.tensors}
        for k, t in self.tensors.items():
            t.copy_(_h2d(flat[k].long(), t.device), non_blocking=True)
        if self.plan is not None:
            pos = flat["position_ids"][0]
            starts = pos == 0
            starts[0] = True
            s = mb["input_ids"].shape[1]
            starts[::s] = True  # every row starts a sample (as train/step.segment_cu_seqlens)
            self.plan.update(torch.cumsum(starts.long(), 0) - 1, _in_sample_positions(starts))

    def batch(self) -> dict:
        return {"_graph": (self.tensors["input_ids"], self.tensors["position_ids"],
                           self.tensors["labels"], self.psp)}


def _in_sample_positions(starts: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... restarting at every sample start (what RoPE rotates by)."""
    idx = torch.arange(starts.numel())
    first = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(first, 0).values


class StepGraph:
    """Runs the step's schedule eagerly for ``warmup`` calls, then captures it once and replays it."""

    def __init__(self, warmup: int, stream: torch.cuda.Stream, scope: str = "full_iteration"):
        if scope != "full_iteration":  # config/validate.py admits only this one
            raise ValueError(f"cuda_graph_scope {scope!r}: only 'full_iteration' is built")
        self.warmup, self.calls, self.stream = max(1, int(warmup)), 0, stream
        self.graph = None
        self.slots: list[_Slot] = []
        self.losses = None

    def run(self, schedule, finalize, microbatches: list[dict], device: torch.device) -> list[dict]:
        """schedule(mbs) -> per-micro-batch loss dicts, with finalize_model_grads taken out;
        finalize(num_tokens) runs it. Returns the loss dicts of this step."""
        self.calls += 1
        if self.calls <= self.warmup:
            losses = schedule(microbatches)
            finalize(_token_count(losses))
            return losses
        if self.graph is None:
            self._capture(schedule, microbatches, device)
        else:
            self._fill(microbatches)
        self.graph.replay()
        finalize(_token_count(self.losses))
        return self.losses

    def _fill(self, microbatches):
        if len(microbatches) != len(self.slots):
            raise RuntimeError(f"cuda graph: {len(microbatches)} micro-batches this step, the captured "
                               f"step had {len(self.slots)}")
        for i, (slot, mb) in enumerate(zip(self.slots, microbatches)):
            want = tuple(slot.tensors["input_ids"].shape)
            got = (1, mb["input_ids"].numel()) if slot.packed else tuple(mb["input_ids"].shape)
            if got != want:
                raise RuntimeError(f"cuda graph: micro-batch {i} holds {got} tokens, the captured step "
                                   f"{want}: every step must have the same shapes")
            slot.fill(mb)

    def _capture(self, schedule, microbatches, device):
        self.slots = [_Slot(mb, device) for mb in microbatches]
        self._fill(microbatches)
        torch.cuda.synchronize(device)
        # The graph gets a memory pool of its own: hand the eager steps' cached blocks back first.
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        # Recording only: the replay that follows computes this step.
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.losses = schedule([s.batch() for s in self.slots])
        log.info("captured the training step (%d micro-batches) as one CUDA graph after %d eager steps",
                 len(self.slots), self.warmup)


def _token_count(losses: list[dict]) -> torch.Tensor:
    """The loss tokens of the step (what megatron's schedule hands finalize_model_grads)."""
    return torch.stack([d["lm loss"][1] for d in losses]).sum().round().to(torch.int)
