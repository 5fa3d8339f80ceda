"""The seed's quickstart flag list through `hpctrain sft` (NPROC_PER_NODE=2 -> self-spawned torchrun,
TP=2, gloo) on a tiny random Qwen2-shaped model converted to mcore, with the real bundled data.

Changed from the seed: paths (local jsonl files, a tiny model), the sample counts (#16 instead of
#500, to fit CI), train_iters (2) and so lr_warmup_iters (1). The packing run uses the seed's later variant
(sequence_parallel, full/uniform recompute, lr_warmup_fraction, max_epochs 1, micro_batch_size 16)
with max_length 256 (see _later_variant).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "hpctrain" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mcore_model(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hpctrain.checkpoint.convert_hf_to_mcore import hf_to_mcore

    tmp = tmp_path_factory.mktemp("quickstart")
    hf = tmp / "tiny-qwen2"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(hf)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, hf / f.name)
    out = tmp / "tiny-qwen2-mcore"
    hf_to_mcore(str(hf), str(out), progress=False)
    return tmp, out


SEED_FLAGS = [
    "--dataset", f"{DATA}/alpaca_gpt4_zh.jsonl#16", f"{DATA}/alpaca_gpt4_en.jsonl#16",
    f"{DATA}/self_cognition.jsonl#16",
    "--tensor_model_parallel_size", "2", "--micro_batch_size", "4", "--global_batch_size", "16",
    "--recompute_granularity", "selective", "--train_iters", "2", "--eval_iters", "5", "--finetune", "true",
    # the seed's warmup is 10 of its 100 iterations: with 2 iterations, 1 (megatron-core's scheduler, like
    # Megatron-LM, needs the warmup shorter than the decay; 10 of 2 is refused at config time)
    "--cross_entropy_loss_fusion", "true", "--lr", "1e-5", "--lr_warmup_iters", "1", "--min_lr", "1e-6",
    "--save", "megatron_output/Qwen2.5-7B-Instruct", "--save_interval", "100", "--max_length", "2048",
    "--system", "You are a helpful assistant.", "--num_workers", "4", "--no_save_optim", "true",
    "--no_save_rng", "true", "--dataset_num_proc", "4", "--model_author", "swift", "--model_name", "swift-robot",
]


def _later_variant(flags: list) -> list:
    f = list(flags)
    drop = {"--recompute_granularity", "--train_iters", "--lr_warmup_iters", "--micro_batch_size", "--max_length"}
    out, i = [], 0
    while i < len(f):
        if f[i] in drop:
            i += 2
            continue
        out.append(f[i])
        i += 1
    return out + ["--sequence_parallel", "true", "--recompute_granularity", "full", "--recompute_method", "uniform",
                  "--recompute_num_layers", "1", "--lr_warmup_fraction", "0.05", "--max_epochs", "1",
                  "--micro_batch_size", "16", "--packing", "true",
                  # 16 packed rows x 2048 tokens x Qwen's 152k vocab is ~10 GB of fp32 logits per TP rank:
                  # too much for a CI box, so rows of 256 tokens here.
                  "--max_length", "256"]


def run_sft(cwd: Path, load: Path, flags: list) -> subprocess.CompletedProcess:
    env = dict(os.environ, NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "hpctrain.cli", "sft", "--load", str(load), *flags]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def check_run(cwd: Path, p: subprocess.CompletedProcess, iters: int | None) -> list:
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    from hpctrain.checkpoint import layout

    versions = layout.version_dirs(cwd / "megatron_output" / "Qwen2.5-7B-Instruct")
    assert len(versions) == 1
    root = versions[0]
    tracked, release = layout.read_tracker(root)
    assert not release and tracked >= 1
    if iters is not None:
        assert tracked == iters
    iters = tracked
    for name in ("args.json", "config.json", "vocab.json", "logging.jsonl", "train_loss.png"):
        assert (root / name).is_file(), name
    assert list((root / "runs").glob("events.out.tfevents.*"))
    args = json.loads((root / "args.json").read_text())
    assert "swift-robot" in json.dumps(args)
    recs = [json.loads(x) for x in (root / "logging.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == iters
    # a random model over Qwen's 151,936-token vocab starts near ln(151936) = 11.93
    assert all(10.5 < v < 13.0 for v in losses), losses
    return losses


def test_seed_quickstart_flags(mcore_model):
    tmp, load = mcore_model
    cwd = tmp / "run_plain"
    cwd.mkdir()
    check_run(cwd, run_sft(cwd, load, SEED_FLAGS), 2)


def test_seed_quickstart_later_variant_packed(mcore_model):
    tmp, load = mcore_model
    cwd = tmp / "run_packed"
    cwd.mkdir()
    p = run_sft(cwd, load, _later_variant(SEED_FLAGS))
    losses = check_run(cwd, p, None)  # max_epochs 1: as many global batches as one pass over the packed rows
    assert len(losses) <= 3  # 48 samples of <= 256 tokens pack into at most 48 rows = 3 batches of 16
