"""Rank-0 training logs: progress line, TensorBoard, logging.jsonl, the training-curves PNG, throughput and MFU.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token (forward + backward):
6 x non-embedding params + 6 x hidden x vocab (output layer) + 6 x layers x hidden x seq
(attention scores and values, causal counted at half). The peak comes from HPCTRAIN_PEAK_TFLOPS
or a table of known GPUs (dense bf16); on the CPU or an unknown device MFU is not reported.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from hpctrain.progress import Progress, format_duration

log = logging.getLogger("hpctrain.train")

_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                "L40S": 362.0, "B200": 2250.0}


def peak_tflops() -> float | None:
    env = os.environ.get("HPCTRAIN_PEAK_TFLOPS")
    if env:
        return float(env)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, v in _PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


def flops_per_token(cfg, seq_len: int) -> float:
    m = cfg.model
    h, L, V = m.hidden_size, m.num_layers, m.padded_vocab_size
    ffn = m.ffn_hidden_size or 4 * h
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    kv = m.kv_channels or h // heads
    attn = h * heads * kv + 2 * h * groups * kv + heads * kv * h
    mlp = (3 if m.swiglu else 2) * h * ffn
    non_emb = L * (attn + mlp)
    return 6 * non_emb + 6 * h * V + 6 * L * h * seq_len


class TrainLogger:
    """Only rank 0 writes. ``out_dir`` holds logging.jsonl and the PNG; TensorBoard goes to tb_dir."""

    def __init__(self, cfg, out_dir: str | None, world_size: int, is_main: bool, total_iters: int):
        self.cfg, self.is_main, self.world = cfg, is_main, world_size
        self.total, self.start = total_iters, time.time()
        self.out = Path(out_dir) if out_dir else None
        self.history: list[dict] = []
        self.tb = None
        self._last_t, self._last_it = time.time(), None
        # Batch logs (not a terminal) also get a count / rate / ETA line every few seconds, between
        # the log_interval lines; on a terminal those lines are enough.
        self.progress: Progress | None = None
        if is_main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            tb_dir = cfg.log.tensorboard_dir or str(self.out / "runs")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(tb_dir, max_queue=cfg.log.tensorboard_queue_size)
            except ImportError:
                log.warning("tensorboard not installed: no TensorBoard events (pip install tensorboard)")

    def step(self, it: int, res, step_time: float, seq_len: int) -> None:
        if not self.is_main:
            return
        tps = res.seq_tokens / max(step_time, 1e-9) / self.world
        # skipped: the optimizer did not update (fp16 loss-scale overflow); the LR schedule did not advance.
        rec = dict(iteration=it, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm, tokens=res.tokens,
                   skipped=not res.update_ok, tokens_per_s_per_gpu=tps, step_time_s=step_time,
                   elapsed_s=time.time() - self.start)
        peak = peak_tflops()
        if peak:
            rec["mfu"] = tps * flops_per_token(self.cfg, seq_len) / (peak * 1e12)
        if torch.cuda.is_available():
            rec["mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        self.history.append(rec)
        self._jsonl(rec)
        self._tb(it, {"train/loss": res.loss, "train/lr": res.lr, "train/grad_norm": res.grad_norm,
                      "train/tokens_per_s_per_gpu": tps, "train/mem_gib": rec.get("mem_gib"),
                      "train/mfu": rec.get("mfu")})
        if self.progress is None:
            self.progress = Progress(self.total, "train", "iterations", initial=it - 1,
                                     enabled=not sys.stderr.isatty())
        self.progress.update(1)
        if it % max(self.cfg.log.log_interval, 1) == 0 or it == self.total:
            log.info(self._line(rec))

    def _line(self, r: dict) -> str:
        el = r["elapsed_s"]
        done = len(self.history)
        eta = el / max(done, 1) * max(self.total - r["iteration"], 0)
        gn = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
        if r.get("skipped"):
            gn += " (step skipped: fp16 overflow)"
        parts = [f"iter {r['iteration']}/{self.total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"grad_norm {gn}", f"tokens/s/gpu {r['tokens_per_s_per_gpu']:.1f}",
                 f"mfu {r['mfu'] * 100:.1f}%" if "mfu" in r else "mfu n/a",
                 f"mem {r['mem_gib']:.1f}GiB" if "mem_gib" in r else "mem n/a",
                 f"elapsed {format_duration(el)}", f"eta {format_duration(eta)}"]
        return " | ".join(parts)

    def eval(self, it: int, loss: float) -> None:
        if not self.is_main:
            return
        import math
        ppl = math.exp(min(loss, 50.0))
        rec = dict(iteration=it, val_loss=loss, val_ppl=ppl)
        self._jsonl(rec)
        self._tb(it, {"val/loss": loss, "val/ppl": ppl})
        log.info("validation at iter %d | loss %.4f | ppl %.3f", it, loss, ppl)

    def _jsonl(self, rec: dict) -> None:
        if self.out is not None:
            with open(self.out / "logging.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _tb(self, it: int, scalars: dict) -> None:
        if self.tb is None or it % max(self.cfg.log.tensorboard_log_interval, 1):
            return
        for k, v in scalars.items():
            if v is not None:
                self.tb.add_scalar(k, float(v), it)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.out is not None and self.history:
            self._plot()

    def _plot(self) -> None:
        """The curves PNG (train/plot.py). Never raises: a full disk here must not hide a save error."""
        from hpctrain.train import plot

        try:
            plot.plot_log(self.out / plot.LOG_NAME)
        except ImportError:
            log.warning("no training-curves PNG: %s", plot.INSTALL_HINT)
        except (OSError, ValueError) as e:
            log.warning("could not write the training-curves PNG in %s: %s (`hpctrain plot %s` draws it later)",
                        self.out, e, self.out)
