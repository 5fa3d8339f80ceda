"""Rank-0 training logs: progress line, TensorBoard, logging.jsonl, the training-curves PNG, throughput and MFU.

logging.jsonl gets every number of every iteration that is measured; the log_* switches decide what
is measured (log_params_norm, log_throughput) and what goes to TensorBoard (lr, timers, memory,
validation perplexity). Tags: train/{loss,lr,grad_norm,params_norm,tokens_per_s_per_gpu,tflops_per_gpu,
mfu}, memory/mem_*, timers/{step,data,save}_s, val/{loss,ppl}.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token (forward + backward):
6 x non-embedding params + 6 x hidden x vocab (output layer) + 6 x layers x hidden x seq
(attention scores and values, causal counted at half). For a MoE model the params are the ACTIVE
ones: a MoE layer counts its router and top-k experts (k x 3 x hidden x moe_ffn), not all experts. The peak comes from HPCTRAIN_PEAK_TFLOPS
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
from hpctrain.train import metrics

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
    from hpctrain.model.families.base import moe_pattern

    m, moe = cfg.model, getattr(cfg, "moe", None)
    h, L, V = m.hidden_size, m.num_layers, m.padded_vocab_size
    ffn = m.ffn_hidden_size or 4 * h
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    kv = m.kv_channels or h // heads
    attn = h * heads * kv + 2 * h * groups * kv + heads * kv * h
    mlp = (3 if m.swiglu else 2) * h * ffn
    pattern = moe_pattern(dict(num_experts=moe.num_experts, num_layers=L, moe_layer_freq=moe.moe_layer_freq or 1)
                          ) if moe is not None and moe.num_experts else ()
    n_moe = sum(pattern)
    active_moe = (moe.moe_router_topk * 3 * h * moe.moe_ffn_hidden_size + h * moe.num_experts) if n_moe else 0
    non_emb = L * attn + (L - n_moe) * mlp + n_moe * active_moe
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

    def step(self, it: int, res, step_time: float, seq_len: int, data_time: float = 0.0,
             params_norm: float | None = None) -> None:
        """One iteration: logging.jsonl always; TensorBoard and the console line as the log_* switches say."""
        if not self.is_main:
            return
        # skipped: the optimizer did not update (fp16 loss-scale overflow); the LR schedule did not advance.
        rec = dict(iteration=it, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm, tokens=res.tokens,
                   skipped=not res.update_ok, step_time_s=step_time, data_time_s=data_time,
                   elapsed_s=time.time() - self.start)
        if params_norm is not None:
            rec["params_norm"] = params_norm
        if res.load_balancing_loss is not None:  # MoE: megatron-core's aux loss, before its coefficient
            rec["load_balancing_loss"] = res.load_balancing_loss
        if self.cfg.log.log_throughput:
            rec.update(metrics.throughput(res.seq_tokens, step_time, self.world, flops_per_token(self.cfg, seq_len),
                                          peak_tflops()))
        rec.update(metrics.memory_gib())
        self.history.append(rec)
        self._jsonl(rec)
        self._tb(it, self._tb_scalars(rec))
        if self.progress is None:
            self.progress = Progress(self.total, "train", "iterations", initial=it - 1,
                                     enabled=not sys.stderr.isatty())
        self.progress.update(1)
        if it % max(self.cfg.log.log_interval, 1) == 0 or it == self.total:
            log.info(self._line(rec))

    def _tb_scalars(self, r: dict) -> dict:
        lg = self.cfg.log
        out = {"train/loss": r["loss"], "train/grad_norm": r["grad_norm"], "train/params_norm": r.get("params_norm"),
               "train/load_balancing_loss": r.get("load_balancing_loss")}
        if not lg.no_log_learning_rate_to_tensorboard:
            out["train/lr"] = r["lr"]
        if lg.log_throughput:
            out.update({f"train/{k}": r.get(k) for k in ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu")})
        if lg.log_memory_to_tensorboard:
            out.update({f"memory/{k}": v for k, v in r.items() if k.startswith("mem_")})
        if lg.log_timers_to_tensorboard:
            out.update({"timers/step_s": r["step_time_s"], "timers/data_s": r["data_time_s"]})
        return out

    def timers(self, it: int, seconds: dict) -> None:
        """Other timed phases (e.g. {"save": s}) to TensorBoard, when log_timers_to_tensorboard."""
        if self.is_main and self.cfg.log.log_timers_to_tensorboard:
            self._tb(it, {f"timers/{k}_s": v for k, v in seconds.items()}, every=True)

    def _line(self, r: dict) -> str:
        el = r["elapsed_s"]
        done = len(self.history)
        eta = el / max(done, 1) * max(self.total - r["iteration"], 0)
        gn = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
        if r.get("skipped"):
            gn += " (step skipped: fp16 overflow)"
        parts = [f"iter {r['iteration']}/{self.total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}", f"grad_norm {gn}"]
        if "params_norm" in r:
            parts.append(f"params_norm {r['params_norm']:.3f}")
        if "load_balancing_loss" in r:
            parts.append(f"load_balancing_loss {r['load_balancing_loss']:.4f}")
        if "tokens_per_s_per_gpu" in r:
            parts += [f"tokens/s/gpu {r['tokens_per_s_per_gpu']:.1f}", f"TFLOP/s/gpu {r['tflops_per_gpu']:.1f}",
                      f"mfu {r['mfu'] * 100:.1f}%" if "mfu" in r else "mfu n/a"]
        parts += [f"mem {r['mem_gib']:.1f}GiB" if "mem_gib" in r else "mem n/a",
                  f"elapsed {format_duration(el)}", f"eta {format_duration(eta)}"]
        return " | ".join(parts)

    def eval(self, it: int, loss: float) -> None:
        if not self.is_main:
            return
        import math
        ppl = math.exp(min(loss, 50.0))
        rec = dict(iteration=it, val_loss=loss, val_ppl=ppl)
        self._jsonl(rec)
        scalars = {"val/loss": loss}
        if self.cfg.log.log_validation_ppl_to_tensorboard:
            scalars["val/ppl"] = ppl
        self._tb(it, scalars, every=True)
        log.info("validation at iter %d | loss %.4f | ppl %.3f", it, loss, ppl)

    def _jsonl(self, rec: dict) -> None:
        if self.out is not None:
            with open(self.out / "logging.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _tb(self, it: int, scalars: dict, every: bool = False) -> None:
        """Write at iterations that are multiples of tensorboard_log_interval (``every``: always)."""
        if self.tb is None or (not every and it % max(self.cfg.log.tensorboard_log_interval, 1)):
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
