"""The seed's quickstart flags parse verbatim, the same settings from TOML give an equal config, and
the DESIGN.md example loads as written."""
import re
import textwrap
from pathlib import Path

import pytest
from schema_walk import field_of, verdict

from hpctrain.config import FIELD_SECTION, JobConfig, load_config
from hpctrain.config.fields import field_default
from hpctrain.config.reference import MARKER
from hpctrain.config.spellings import SPELLINGS

SEED_ENV = {"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}

# `megatron sft \` ... verbatim from the seed's quickstart, as the shell would split it.
QUICKSTART = [
    "--load", "Qwen2.5-7B-Instruct-mcore",
    "--dataset", "AI-ModelScope/alpaca-gpt4-data-zh#500",
    "AI-ModelScope/alpaca-gpt4-data-en#500",
    "swift/self-cognition#500",
    "--tensor_model_parallel_size", "2",
    "--micro_batch_size", "4",
    "--global_batch_size", "16",
    "--recompute_granularity", "selective",
    "--train_iters", "100",
    "--eval_iters", "5",
    "--finetune", "true",
    "--cross_entropy_loss_fusion", "true",
    "--lr", "1e-5",
    "--lr_warmup_iters", "10",
    "--min_lr", "1e-6",
    "--save", "megatron_output/Qwen2.5-7B-Instruct",
    "--save_interval", "100",
    "--max_length", "2048",
    "--system", "You are a helpful assistant.",
    "--num_workers", "4",
    "--no_save_optim", "true",
    "--no_save_rng", "true",
    "--dataset_num_proc", "4",
    "--model_author", "swift",
    "--model_name", "swift-robot",
]

QUICKSTART_TOML = """
[model]
load = "Qwen2.5-7B-Instruct-mcore"
finetune = true

[data]
dataset = ["AI-ModelScope/alpaca-gpt4-data-zh#500", "AI-ModelScope/alpaca-gpt4-data-en#500",
           "swift/self-cognition#500"]
max_length = 2048
system = "You are a helpful assistant."
num_workers = 4
dataset_num_proc = 4
model_author = ["swift"]
model_name = "swift-robot"   # a scalar becomes a one-item list

[parallel]
tensor_model_parallel_size = 2

[train]
micro_batch_size = 4
global_batch_size = 16
recompute_granularity = "selective"
train_iters = 100
cross_entropy_loss_fusion = true
lr = 1e-5
lr_warmup_iters = 10
min_lr = 1e-6

[eval]
eval_iters = 5

[checkpoint]
save = "megatron_output/Qwen2.5-7B-Instruct"
save_interval = 100
no_save_optim = true
no_save_rng = true
"""


def expected_quickstart() -> dict:
    """Every field the quickstart sets or derives, by (section, field)."""
    return {
        ("model", "load"): "Qwen2.5-7B-Instruct-mcore",
        ("data", "dataset"): ["AI-ModelScope/alpaca-gpt4-data-zh#500", "AI-ModelScope/alpaca-gpt4-data-en#500",
                              "swift/self-cognition#500"],
        ("parallel", "tensor_model_parallel_size"): 2,
        ("train", "micro_batch_size"): 4,
        ("train", "global_batch_size"): 16,
        ("train", "recompute_granularity"): "selective",
        ("train", "train_iters"): 100,
        ("eval", "eval_iters"): 5,
        ("model", "finetune"): True,
        ("train", "cross_entropy_loss_fusion"): True,
        ("train", "lr"): 1e-5,
        ("train", "lr_warmup_iters"): 10,
        ("train", "min_lr"): 1e-6,
        ("checkpoint", "save"): "megatron_output/Qwen2.5-7B-Instruct",
        ("checkpoint", "save_interval"): 100,
        ("data", "max_length"): 2048,
        ("data", "system"): "You are a helpful assistant.",
        ("data", "num_workers"): 4,
        ("checkpoint", "no_save_optim"): True,
        ("checkpoint", "no_save_rng"): True,
        ("data", "dataset_num_proc"): 4,
        ("data", "model_author"): ["swift"],
        ("data", "model_name"): ["swift-robot"],
        # derived by resolve(), as Megatron-SWIFT does
        ("data", "seq_length"): 2048,
        ("data", "packing_length"): 2048,
        ("train", "lr_decay_iters"): 100,
        ("eval", "eval_interval"): 100,
        ("train", "mode"): "sft",
        # untouched Megatron-SWIFT defaults the run relies on
        ("parallel", "pipeline_model_parallel_size"): 1,
        ("parallel", "sequence_parallel"): False,
        ("parallel", "use_distributed_optimizer"): True,
        ("train", "lr_decay_style"): "cosine",
        ("optim", "weight_decay"): 0.1,
        ("optim", "adam_beta2"): 0.95,
        ("checkpoint", "add_version"): True,
        ("data", "packing"): False,
        ("precision", "bf16"): None,  # from config.json's torch_dtype at train time
    }


def check_all(cfg: JobConfig, expected: dict) -> None:
    for (sec, name), value in expected.items():
        got = getattr(getattr(cfg, sec), name)
        assert got == value and type(got) is type(value), f"{sec}.{name}: {got!r} != {value!r}"


def test_quickstart_flags_verbatim():
    cfg = load_config(None, QUICKSTART, mode="sft", environ=SEED_ENV)
    check_all(cfg, expected_quickstart())
    assert cfg.launch.nproc_per_node == 2
    assert cfg.launch.cuda_visible_devices == "0,1"
    # nothing else moved off its default: compare against a default config with the expected fields set
    ref = JobConfig()
    for (sec, name), value in expected_quickstart().items():
        setattr(getattr(ref, sec), name, value)
    ref.launch.nproc_per_node, ref.launch.cuda_visible_devices = 2, "0,1"
    assert cfg == ref


def test_quickstart_from_toml_equals_flags(tmp_path):
    path = tmp_path / "quickstart.toml"
    path.write_text(QUICKSTART_TOML)
    from_toml = load_config(path, mode="sft", environ=SEED_ENV)
    from_flags = load_config(None, QUICKSTART, mode="sft", environ=SEED_ENV)
    assert from_toml == from_flags


def test_later_seed_variant():
    argv = list(QUICKSTART)
    argv[argv.index("--micro_batch_size") + 1] = "16"
    i = argv.index("--recompute_granularity")
    argv[i:i + 2] = ["--recompute_granularity", "full", "--recompute_method", "uniform",
                     "--recompute_num_layers", "1"]
    i = argv.index("--lr_warmup_iters")
    argv[i:i + 2] = ["--lr_warmup_fraction", "0.05"]
    argv += ["--sequence_parallel", "true", "--max_epochs", "1"]
    cfg = load_config(None, argv, environ=SEED_ENV)
    assert cfg.train.micro_batch_size == 16 and cfg.train.global_batch_size == 16
    assert (cfg.train.recompute_granularity, cfg.train.recompute_method, cfg.train.recompute_num_layers) == (
        "full", "uniform", 1)
    assert cfg.train.lr_warmup_fraction == 0.05 and cfg.train.lr_warmup_iters == 0
    assert cfg.parallel.sequence_parallel is True and cfg.train.max_epochs == 1


DESIGN_TOML = textwrap.dedent("""
    [model]
    load = "Qwen2.5-7B-Instruct-mcore"        # mcore checkpoint to start from (finetune = true resets iteration)
    finetune = true

    [data]
    dataset = ["alpaca_gpt4_zh.jsonl#500", "alpaca_gpt4_en.jsonl#500", "self_cognition.jsonl#500"]
    max_length = 2048
    system = "You are a helpful assistant."
    model_name = ["小黄", "swift-robot"]         # self-cognition: zh, en
    model_author = ["魔搭", "swift"]
    packing = true

    [parallel]
    tensor_model_parallel_size = 2
    pipeline_model_parallel_size = 1
    context_parallel_size = 1
    sequence_parallel = true

    [train]
    micro_batch_size = 4
    global_batch_size = 16
    train_iters = 100
    recompute_granularity = "selective"
    lr = 1e-5
    lr_warmup_iters = 10
    min_lr = 1e-6

    [checkpoint]
    save = "megatron_output/Qwen2.5-7B-Instruct"
    save_interval = 100
    no_save_optim = true

    [slurm]
    partition = "gpu"
    gpus_per_node = 8
    time = "04:00:00"
""")


def test_design_example_loads(tmp_path):
    path = tmp_path / "design.toml"
    path.write_text(DESIGN_TOML, encoding="utf-8")
    cfg = load_config(str(path), environ={})
    assert cfg.data.model_name == ["小黄", "swift-robot"] and cfg.data.model_author == ["魔搭", "swift"]
    assert cfg.data.packing is True and cfg.data.packing_length == 2048
    assert cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.slurm.partition, cfg.slurm.gpus_per_node, cfg.slurm.time) == ("gpu", 8, "04:00:00")
    assert cfg.train.lr == 1e-5 and cfg.train.min_lr == 1e-6 and cfg.train.lr_warmup_iters == 10


@pytest.mark.parametrize("mode", ["sft", "pt"])
def test_mode_comes_from_the_subcommand(mode):
    cfg = load_config(None, ["--dataset", "a.jsonl"], mode=mode, environ={})
    assert cfg.train.mode == mode


# The seed's argument table: every flag of its quickstart, and the other seed flags (the ones issue 15
# names), each with the seed's (Megatron-SWIFT's) default.
SEED_TABLE = {
    "load": None, "dataset": [], "tensor_model_parallel_size": 1, "micro_batch_size": 1, "global_batch_size": 16,
    "recompute_granularity": "selective", "train_iters": None, "eval_iters": -1, "finetune": False,
    "cross_entropy_loss_fusion": False, "lr": None, "lr_warmup_iters": 0, "min_lr": 0.0, "save": None,
    "save_interval": 500, "max_length": None, "system": None, "num_workers": 4, "no_save_optim": False,
    "no_save_rng": False, "dataset_num_proc": 1, "model_author": None, "model_name": None,
    "ckpt_format": "torch_dist", "auto_detect_ckpt_format": True, "dataloader_type": "cyclic",
    "no_initialization": True, "group_query_attention": None, "distributed_timeout_minutes": 60,
    "log_params_norm": True, "log_throughput": True, "log_timers_to_tensorboard": True,
    "no_log_learning_rate_to_tensorboard": False, "log_validation_ppl_to_tensorboard": True,
    "log_memory_to_tensorboard": True, "transformer_impl": "transformer_engine", "position_embedding_type": "rope",
    "no_masked_softmax_fusion": False, "apply_query_key_layer_scaling": None, "attention_softmax_in_fp32": True,
    "use_flash_attn": False,
}
DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def documented_differences(text: str) -> dict[str, str]:
    """{key: reason} from docs/config.md's table of defaults that differ from the seed."""
    part = text.split("## Defaults that differ from the seed", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|[^|]*\| ([^|]+) \|$", part, re.M)}


def test_seed_flags_documented_with_their_defaults_and_walked():
    text = DOC.read_text(encoding="utf-8")
    generated, differ = text.split(MARKER, 1)[1], documented_differences(text)
    for flag, seed_default in SEED_TABLE.items():
        if flag in SPELLINGS:
            ours, row = SPELLINGS[flag].default, rf"^\| `{flag}` \| `{re.escape(repr(SPELLINGS[flag].default))}` \|"
            sec, name = SPELLINGS[flag].section, SPELLINGS[flag].field
        else:
            sec, name = FIELD_SECTION[flag], flag
            ours = field_default(field_of(sec, name))
            row = rf"^\| `{flag}` \| [^|]+ \| `{re.escape(repr(ours))}` \|"
        assert re.search(row, generated, re.M), f"{flag}: no row with its default {ours!r} in docs/config.md"
        assert verdict(sec, name), f"{flag}: neither read nor refused"
        assert ours == seed_default or flag in differ, f"{flag}: default {ours!r}, the seed's {seed_default!r}"
    assert set(differ) <= set(SEED_TABLE), "the differences table lists only seed flags"
