"""`hpctrain sft` on GPUs: a Qwen2.5-0.5B-shaped model (real config, random bf16 weights) at TP=2 with
sequence parallel, packing and the chunked cross entropy, on the bundled alpaca data. Skipped without
two CUDA devices; the last results are recorded in docs/benchmarks.md ("Trainer on GPUs").

Checks: both runs finish and save; the TP=2 run's first loss equals the TP=1 run's (same seed, same
initial weights: megatron-core initialises the full weights and shards them, use_cpu_initialization)
within bf16 tolerance; the loss falls from ~ln(151936) = 11.9; throughput and memory are logged.
Set HPCTRAIN_GPU_RESULTS=DIR to keep a JSON summary there (tools/bench/gpu_lease.sh does).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hpctrain" / "assets" / "configs" / "qwen2.5-0.5b-instruct.config.json"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
DATA = ROOT / "hpctrain" / "assets" / "data"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs (runs on the device machine)")

ITERS = 30


def model_dir(tmp: Path) -> Path:
    d = tmp / "qwen2.5-0.5b-random"
    d.mkdir()
    shutil.copy(CONFIG, d / "config.json")
    for f in TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)
    return d


def sft(tmp: Path, model: Path, name: str, tp: int, iters: int, *extra: str) -> tuple[list, float, Path]:
    save = tmp / name
    flags = ["--model", str(model), "--load_safetensors", "false",  # config + tokenizer only: random init
             "--dataset", f"{DATA}/alpaca_gpt4_en.jsonl#1000", f"{DATA}/alpaca_gpt4_zh.jsonl#1000",
             "--tensor_model_parallel_size", str(tp), "--sequence_parallel", str(tp > 1).lower(),
             "--micro_batch_size", "4", "--global_batch_size", "8",
             "--max_length", "2048", "--packing", "true", "--cross_entropy_loss_fusion", "true",
             "--torch_dtype", "bfloat16", "--lr", "1e-4", "--lr_warmup_iters", "5", "--min_lr", "1e-5",
             "--train_iters", str(iters), "--seed", "42", "--save", str(save), "--save_interval", str(iters),
             "--no_save_optim", "true", "--add_version", "false", "--log_interval", "1", *extra]
    env = dict(os.environ, NPROC_PER_NODE="2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "hpctrain.cli", "sft", *flags], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{name}: rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    recs = [json.loads(x) for x in (save / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "tokens_per_s_per_gpu" in r]
    assert len(steps) == iters
    from hpctrain.checkpoint import layout
    assert layout.read_tracker(save)[0] == iters
    return steps, max(r.get("mem_gib", 0.0) for r in steps), save


def test_qwen25_05b_tp2_on_gpus(tmp_path):
    model = model_dir(tmp_path)
    tp2, mem2, trained = sft(tmp_path, model, "tp2", 2, ITERS)
    first = tp2[0]["loss"]
    assert 11.0 < first < 12.8, first  # random init over 151,936 tokens: ln V = 11.93
    last = sum(r["loss"] for r in tp2[-5:]) / 5
    assert last < first - 2.0, (first, last)
    # The trained weights at another layout: TP=1 x DP=2 and TP=2 see the same global batch first.
    again_tp2, _, _ = sft(tmp_path, model, "again_tp2", 2, 1, "--load", str(trained), "--finetune", "true")
    dp2, mem1, _ = sft(tmp_path, model, "dp2", 1, 1, "--load", str(trained), "--finetune", "true")
    assert dp2[0]["loss"] == pytest.approx(again_tp2[0]["loss"], rel=5e-3)  # bf16 sums in another order
    assert dp2[0]["loss"] < first - 2.0
    steady = tp2[5:]
    summary = dict(
        model="Qwen2.5-0.5B shape (random bf16)", layout="TP=2 + SP, 2 GPUs", seq=2048, micro_batch=4,
        global_batch=8, packing=True, iterations=ITERS, first_loss=first, last5_loss=last,
        tokens_per_s_per_gpu=sorted(r["tokens_per_s_per_gpu"] for r in steady)[len(steady) // 2],
        step_time_s=sorted(r["step_time_s"] for r in steady)[len(steady) // 2], peak_mem_gib=mem2,
        reload_loss_tp2=again_tp2[0]["loss"], reload_loss_tp1_dp2=dp2[0]["loss"], tp1_dp2_peak_mem_gib=mem1,
        device=torch.cuda.get_device_name(0))
    out = os.environ.get("HPCTRAIN_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "trainer_gpu.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
