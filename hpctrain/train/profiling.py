"""``--profile true`` (Megatron-LM's flag, with ``profile_step_start`` / ``profile_step_end``): the
torch profiler over those training steps, written next to the checkpoints.

Writes ``profile/steps_<start>-<end>.txt``: wall time of the profiled steps, how much of it the GPU
was busy (the union of kernel intervals: a step whose GPU is busy for much less than its wall time
waits for the host), and the ops/kernels by device time; plus a Chrome trace (``.json``) for
https://ui.perfetto.dev. Rank 0 only.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("hpctrain.train")


class StepProfiler:
    """Call ``before(it)`` and ``after(it)`` around training iteration ``it`` (1-based)."""

    def __init__(self, cfg, out_dir: str | None, is_main: bool):
        t = cfg.train
        self.on = bool(t.profile) and is_main
        self.start, self.end = t.profile_step_start, t.profile_step_end
        self.dir = Path(out_dir or ".") / "profile"
        self.prof, self.t0 = None, 0.0

    def before(self, it: int) -> None:
        if not self.on or it != self.start:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        _sync()
        self.t0 = time.perf_counter()

    def after(self, it: int) -> None:
        if self.prof is None or it != self.end:
            return
        _sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = self.dir / f"steps_{self.start}-{self.end}"
        busy = gpu_busy_seconds(self.prof)
        cuda = torch.cuda.is_available()
        table = self.prof.key_averages().table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40,
            max_name_column_width=70)
        head = f"# steps {self.start}-{self.end}: wall {wall * 1e3:.1f} ms"
        if cuda:
            head += f", GPU busy {busy * 1e3:.1f} ms ({busy / wall:.0%} of wall)"
        name.with_suffix(".txt").write_text(head + "\n" + table)
        self.prof.export_chrome_trace(str(name.with_suffix(".json")))
        log.info("profile of steps %d-%d written to %s.txt (%s)", self.start, self.end, name,
                 f"GPU busy {busy / wall:.0%} of wall" if cuda else "CPU only")
        self.prof = None


def gpu_busy_seconds(prof) -> float:
    """Union of the device kernels' time intervals (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, cur_start, cur_end = 0, None, None
    for a, b in spans:
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total / 1e6


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
