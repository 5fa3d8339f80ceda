#!/usr/bin/env python3
"""LoRA benchmark (issue 20): hpctrain's LoRA on megatron-core vs HF transformers + peft, one GPU.

    python3 tools/bench/bench_lora.py --out DIR [--budget_s 240]      # GPU (the `lora` stage of gpu_final.sh)
    python3 tools/bench/bench_lora.py --out DIR --smoke               # CPU smoke run, tiny shapes

Model: the Qwen2.5-7B shape (hpctrain/assets/configs/qwen2.5-7b-instruct.config.json), random bf16
weights. LoRA rank 8, alpha 32, dropout 0.05, all linears (q/k/v/o/gate/up/down), AdamW on the adapters.
Variants, each its own process (one failure or timeout is an error record; the rest still run), in
this order while the budget lasts:

  ours_lora_mb1 / _mb4   the real `hpctrain sft --train_type lora` (packed alpaca-gpt4-en + self-cognition
                         rows of 2048 tokens, --load_safetensors false, selective recompute of core_attn
                         and mlp_act, chunked cross entropy), micro-batch 1 / 4
  hf_peft_mb1 / _mb4     Qwen2ForCausalLM (sdpa) + peft.get_peft_model, random token rows of 2048, fused
                         AdamW; mb4 retried with gradient checkpointing if it runs out of memory
  ours_full_L2 / _L4     `hpctrain sft` full fine-tune of the shape cut to 2 / 4 layers, micro-batch 1:
                         per-layer memory and step time of full training, extrapolated to 28 layers
  ours_lora_mb1_ln / _mb4_ln  the same with "layernorm" added to the recompute modules
  ours_lora_mb1_nodrop   ours_lora_mb1 with lora_dropout 0 (last: only if the budget is left)

Per variant: peak allocated GiB, median tokens/s and step time over the steps after warm-up. The
trainer is stopped (SIGKILL of its process group) once it has logged its steps, so the final 15 GB
checkpoint save is not timed. Writes DIR/bench_lora.jsonl (one record per variant) and DIR/summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "hpctrain" / "assets" / "configs"
DATA = ROOT / "hpctrain" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2)
LORA = dict(rank=8, alpha=32, dropout=0.05)


def log(msg: str) -> None:
    print(f"[bench_lora] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def model_dir(work: Path, name: str, smoke: bool, layers: int | None) -> Path:
    """A model folder: the 7B config.json (cut to ``layers``; tiny in smoke mode) + the Qwen2.5 tokenizer."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((CONFIGS / "qwen2.5-7b-instruct.config.json").read_text())
    if smoke:
        cfg.update(TINY)
    if layers:
        cfg["num_hidden_layers"] = layers
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, d / f.name)
    return d


# ----------------------------------------------------------------------------------------------- ours
RECOMPUTE = ("core_attn", "mlp_act")


def ours_cmd(model: Path, save: Path, mb: int, iters: int, seq: int, lora: bool, smoke: bool,
             dropout: float = LORA["dropout"], recompute: tuple[str, ...] = RECOMPUTE) -> list[str]:
    cmd = [sys.executable, "-m", "hpctrain.cli", "sft", "--model", str(model), "--load_safetensors", "false",
           "--dataset", str(DATA / "alpaca_gpt4_en.jsonl"), str(DATA / "self_cognition.jsonl"),
           "--model_name", "hpctrain-bot", "--model_author", "hpctrain", "--max_length", str(seq),
           "--packing", "true", "--cross_entropy_loss_fusion", "true", "--recompute_granularity", "selective",
           "--recompute_modules", *recompute,
           "--micro_batch_size", str(mb), "--global_batch_size", str(mb), "--train_iters", str(iters),
           "--lr", "1e-4", "--save", str(save), "--add_version", "false", "--save_interval", "100000",
           "--no_save_optim", "true", "--log_interval", "1", "--log_params_norm", "false",
           "--split_dataset_ratio", "0", "--dataset_num_proc", "1", "--num_workers", "1",
           "--torch_dtype", "float32" if smoke else "bfloat16"]
    if lora:
        cmd += ["--train_type", "lora", "--lora_rank", str(LORA["rank"]), "--lora_alpha", str(LORA["alpha"]),
                "--lora_dropout", str(dropout), "--target_modules", "all-linear"]
    return cmd


def run_ours(name: str, cmd: list[str], save: Path, iters: int, timeout: float, logf: Path) -> dict:
    """Run the trainer until logging.jsonl holds ``iters`` records (or it exits / times out), then
    kill its process group: the final checkpoint save is not part of the measurement."""
    shutil.rmtree(save, ignore_errors=True)
    t0 = time.time()
    with open(logf, "w") as out:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        recs = []
        while time.time() - t0 < timeout:
            recs = _records(save / "logging.jsonl")
            if len(recs) >= iters or proc.poll() is not None:
                break
            time.sleep(1.0)
        rc = proc.poll()
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    recs = _records(save / "logging.jsonl")
    wall = time.time() - t0
    if len(recs) < iters:
        why = "timeout" if rc is None else f"exit {rc}"
        return dict(variant=name, status="error", error=f"{why} after {len(recs)} of {iters} steps: "
                    f"{_tail(logf)}", wall_s=round(wall, 1))
    steps = recs[min(2, len(recs) - 1):]  # the first steps compile flex_attention / autotune
    mem = max(r.get("mem_gib", r.get("mem_rss_peak_gib", 0.0)) for r in recs)
    return dict(variant=name, status="ok", peak_gib=round(mem, 2),
                tokens_per_s=round(statistics.median(r["tokens_per_s_per_gpu"] for r in steps), 1),
                step_ms=round(1000 * statistics.median(r["step_time_s"] for r in steps), 1),
                steps=len(recs), wall_s=round(wall, 1))


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "tokens_per_s_per_gpu" in r and "step_time_s" in r:
            out.append(r)
    return out


def _tail(path: Path, n: int = 3) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return " | ".join(lines[-n:])[-600:]


# ------------------------------------------------------------------------------------------ HF + peft
def hf_worker(a) -> None:
    """One HF + peft measurement in this process; prints one JSON line."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    cfg = AutoConfig.from_pretrained(a.model)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.mb, a.seq), generator=g).to(dev)
    times = []
    for _ in range(a.iters):
        t0 = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    step = statistics.median(times[min(2, len(times) - 1):])
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    print(json.dumps(dict(status="ok", peak_gib=round(peak, 2), tokens_per_s=round(a.mb * a.seq / step, 1),
                          step_ms=round(1000 * step, 1), steps=len(times), gradient_checkpointing=a.gc)), flush=True)


def run_hf(name: str, model: Path, mb: int, seq: int, iters: int, gc: bool, smoke: bool, timeout: float,
           logf: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf_worker", "--model", str(model), "--mb", str(mb),
           "--seq", str(seq), "--iters", str(iters)] + (["--gc"] if gc else []) + (["--smoke"] if smoke else [])
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(variant=name, status="error", error=f"timeout after {timeout:.0f} s", wall_s=round(time.time() - t0, 1))
    logf.write_text(p.stdout + p.stderr)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    if p.returncode or line is None:
        oom = "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr
        return dict(variant=name, status="oom" if oom else "error", error=_tail(logf), wall_s=round(time.time() - t0, 1))
    return dict(variant=name, **json.loads(line), wall_s=round(time.time() - t0, 1))


# ------------------------------------------------------------------------------------------- driver
def plan(smoke: bool) -> list[dict]:
    seq = 128 if smoke else 2048
    it = 3 if smoke else 7
    return [dict(name="ours_lora_mb1", kind="ours", lora=True, mb=1, layers=None, seq=seq, iters=it, est=70),
            dict(name="hf_peft_mb1", kind="hf", mb=1, layers=None, seq=seq, iters=it, est=45),
            dict(name="ours_lora_mb4", kind="ours", lora=True, mb=4, layers=None, seq=seq, iters=it, est=60),
            # + megatron-core's "layernorm" recompute: the two norms' outputs (the adapters' A input
            # of QKV and fc1) are freed after use and recomputed before the backward
            dict(name="ours_lora_mb1_ln", kind="ours", lora=True, mb=1, layers=None, seq=seq, iters=it, est=60,
                 recompute=RECOMPUTE + ("layernorm",)),
            dict(name="ours_lora_mb4_ln", kind="ours", lora=True, mb=4, layers=None, seq=seq, iters=it, est=60,
                 recompute=RECOMPUTE + ("layernorm",)),
            dict(name="hf_peft_mb4", kind="hf", mb=4, layers=None, seq=seq, iters=it, est=45),
            dict(name="ours_full_L2", kind="ours", lora=False, mb=1, layers=2, seq=seq, iters=it, est=35),
            dict(name="ours_full_L4", kind="ours", lora=False, mb=1, layers=4, seq=seq, iters=it, est=35),
            # what the adapter dropout costs (model/lora/dropout.py keeps no copy of its input)
            dict(name="ours_lora_mb1_nodrop", kind="ours", lora=True, mb=1, layers=None, seq=seq, iters=it, est=60,
                 dropout=0.0)]


def run_variant(v: dict, work: Path, smoke: bool, timeout: float) -> dict:
    model = model_dir(work, f"model_L{v['layers'] or 'all'}", smoke, v["layers"])
    logf = work / f"{v['name']}.log"
    if v["kind"] == "ours":
        save = work / f"run_{v['name']}"
        cmd = ours_cmd(model, save, v["mb"], v["iters"], v["seq"], v["lora"], smoke, v.get("dropout", LORA["dropout"]),
                       v.get("recompute", RECOMPUTE))
        rec = run_ours(v["name"], cmd, save, v["iters"], timeout, logf)
    else:
        rec = run_hf(v["name"], model, v["mb"], v["seq"], v["iters"], False, smoke, timeout, logf)
        if rec["status"] == "oom":
            log(f"{v['name']}: out of memory without gradient checkpointing; retrying with it")
            rec = run_hf(v["name"] + "+gc", model, v["mb"], v["seq"], v["iters"], True, smoke, timeout, logf)
    return dict(rec, micro_batch=v["mb"], seq=v["seq"], layers=v["layers"] or "all")


def summary(recs: list[dict], smoke: bool) -> str:
    by = {r["variant"].replace("+gc", ""): r for r in recs}
    lines = [f"# LoRA benchmark ({'CPU smoke, tiny shapes' if smoke else 'Qwen2.5-7B shape, one GPU, bf16'})", "",
             f"LoRA rank {LORA['rank']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}, all linears; "
             "sequence 2048 (smoke: 128); tokens/s and step time are medians after 2 warm-up steps.", "",
             "| variant | micro-batch | layers | status | peak GiB | tokens/s | step ms |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['variant']} | {r.get('micro_batch')} | {r.get('layers')} | {r['status']} | "
                     f"{r.get('peak_gib', '')} | {r.get('tokens_per_s', '')} | {r.get('step_ms', '')} |")
    lines.append("")
    for mb in (1, 4):
        o, h = by.get(f"ours_lora_mb{mb}", {}), by.get(f"hf_peft_mb{mb}", {})
        if o.get("status") == "ok" and h.get("status") == "ok":
            lines.append(f"- mb {mb}: ours / HF+peft tokens/s = {o['tokens_per_s'] / h['tokens_per_s']:.2f}x "
                         f"(target > 1), peak {o['peak_gib']} vs {h['peak_gib']} GiB")
    for name in ("ours_lora_mb1", "ours_lora_mb1_ln"):
        o = by.get(name, {})
        if o.get("status") == "ok":
            lines.append(f"- {name} (mb 1 x 2048) peak {o['peak_gib']} GiB (target <= 28): "
                         f"{'met' if o['peak_gib'] <= 28 else 'NOT met'}")
    f2, f4 = by.get("ours_full_L2", {}), by.get("ours_full_L4", {})
    if f2.get("status") == "ok" and f4.get("status") == "ok":
        per_mem, per_ms = (f4["peak_gib"] - f2["peak_gib"]) / 2, (f4["step_ms"] - f2["step_ms"]) / 2
        lines.append(f"- our full fine-tune per layer (mb 1): {per_mem:.2f} GiB, {per_ms:.1f} ms; extrapolated to "
                     f"28 layers: {f2['peak_gib'] + 26 * per_mem:.1f} GiB, {f2['step_ms'] + 26 * per_ms:.0f} ms/step")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results folder (bench_lora.jsonl, summary.md)")
    ap.add_argument("--budget_s", type=float, default=240.0, help="total wall-clock budget")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the script end to end")
    ap.add_argument("--variants", help="comma-separated subset of the variant names")
    ap.add_argument("--hf_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model"), ap.add_argument("--mb", type=int), ap.add_argument("--seq", type=int)
    ap.add_argument("--iters", type=int), ap.add_argument("--gc", action="store_true")
    a = ap.parse_args()
    if a.hf_worker:
        hf_worker(a)
        return 0
    if not a.out:
        ap.error("--out DIR is required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the children run on the CPU
    start, recs = time.time(), []
    jsonl = out / "bench_lora.jsonl"
    jsonl.write_text("")
    wanted = set(a.variants.split(",")) if a.variants else None
    for v in plan(a.smoke):
        if wanted and v["name"] not in wanted:
            continue
        left = a.budget_s - (time.time() - start)
        if left < max(20.0, 0.6 * v["est"]):  # est: a guess of its wall time on an H200
            rec = dict(variant=v["name"], status="skipped", error=f"budget: {left:.0f} s left")
        else:
            log(f"{v['name']} (budget left {left:.0f} s)")
            try:
                rec = run_variant(v, work, a.smoke, timeout=max(30.0, min(left, 2.5 * v["est"])))
            except Exception as e:  # noqa: BLE001 - one variant's failure is a record, the rest still run
                rec = dict(variant=v["name"], status="error", error=f"{type(e).__name__}: {e}")
        log(json.dumps(rec))
        recs.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
    (out / "summary.md").write_text(summary(recs, a.smoke))
    print((out / "summary.md").read_text())
    return 0 if all(r["status"] in ("ok", "skipped") for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
