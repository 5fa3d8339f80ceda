"""examples/ never rot: every TOML loads with load_config, the 7B file holds the seed's quickstart values,
the submit scripts render a valid plan + sbatch script (--dry-run), the shell scripts parse."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_toml_loads(path):
    from hpctrain.config import load_config

    cfg = load_config(str(path))
    assert cfg.to_dict()


def test_7b_example_has_the_seed_values():
    from hpctrain.config import load_config

    cfg = load_config(str(EXAMPLES / "qwen2.5-7b-sft.toml"))
    assert cfg.model.load == "Qwen2.5-7B-Instruct-mcore" and cfg.model.finetune is True
    assert cfg.data.dataset == ["AI-ModelScope/alpaca-gpt4-data-zh#500", "AI-ModelScope/alpaca-gpt4-data-en#500",
                                "swift/self-cognition#500"]
    assert (cfg.data.max_length, cfg.data.seq_length, cfg.data.packing) == (2048, 2048, True)
    assert cfg.data.system == "You are a helpful assistant."
    assert (cfg.data.model_name, cfg.data.model_author) == (["swift-robot"], ["swift"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    t = cfg.train
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters) == (4, 16, 100)
    assert t.recompute_granularity == "selective" and t.cross_entropy_loss_fusion is True
    assert (t.lr, t.lr_warmup_iters, t.min_lr) == (1e-5, 10, 1e-6)
    assert cfg.eval.eval_iters == 5
    c = cfg.checkpoint
    assert (c.save, c.save_interval, c.no_save_optim, c.no_save_rng) == \
        ("megatron_output/Qwen2.5-7B-Instruct", 100, True, True)
    assert (cfg.slurm.nodes, cfg.slurm.gpus_per_node) == (1, 2)


def test_cluster_profile_is_only_slurm():
    from hpctrain.launch.profile import profile_overrides

    keys = profile_overrides(str(EXAMPLES / "cluster.toml"))
    assert keys and all(section == "slurm" for section, _ in keys)


@pytest.mark.parametrize("script", sorted(EXAMPLES.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("script,expect", [
    ("submit-1x2.sh", ["TP=2 PP=1 CP=1 DP=1 on 2 GPUs (1 nodes x 2)", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2",
                       "micro 4 x dp 1 x accumulation 4 = global 16"]),
    ("submit-4x8.sh", ["TP=2 PP=1 CP=1 DP=16 on 32 GPUs (4 nodes x 8)", "#SBATCH --nodes=4",
                       "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "= global 16"]),
])
def test_submit_examples_dry_run(script, expect, tmp_path):
    # The plan needs the model's shape: a converted checkpoint's root holds the HF config.json.
    ckpt = tmp_path / "Qwen2.5-7B-Instruct-mcore"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((ROOT / "hpctrain/assets/configs/qwen2.5-7b-instruct.config.json").read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(EXAMPLES / script), "--dry-run", "--load", str(ckpt),
                        "--slurm.folder", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for text in expect:
        assert text in r.stdout, (text, r.stdout)
    assert "#SBATCH --partition=gpu" in r.stdout  # from the profile
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing
