"""Precedence (defaults < TOML < env < CLI), flag spellings, derived defaults, dump/reload round trips."""
import json
import tomllib

import pytest

from hpctrain.config import (
    FIELD_SECTION, SECTIONS, JobConfig, config_from_argv, dump_json, dump_toml, load_config, read_config, to_toml,
)


def test_field_names_unique_and_documented():
    import dataclasses

    seen = set()
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen
            seen.add(f.name)
            assert f.metadata.get("help"), f"{sec}.{f.name} has no help"
    assert seen == set(FIELD_SECTION)
    assert len(seen) > 200  # the whole Megatron-SWIFT list, not a subset


def test_precedence_defaults_toml_env_cli(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[train]\nlr = 2e-5\nmicro_batch_size = 2\n[launch]\nnproc_per_node = 8\n'
                 '[data]\ndataset = ["a.jsonl"]\n')
    cfg = load_config(p, ["--lr", "3e-5"], environ={"NPROC_PER_NODE": "4"})
    assert cfg.train.lr == 3e-5             # CLI beats TOML
    assert cfg.train.micro_batch_size == 2  # TOML beats default
    assert cfg.launch.nproc_per_node == 4   # env beats TOML
    assert cfg.train.global_batch_size == 16  # default
    assert load_config(p, ["--nproc_per_node", "2"], environ={"NPROC_PER_NODE": "4"}).launch.nproc_per_node == 2
    # a repeated flag: the last one wins
    assert load_config(None, ["--lr", "1e-4", "--lr", "5e-5"], environ={}).train.lr == 5e-5


def test_flag_spellings_are_equivalent():
    spellings = [
        ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--parallel.tensor_model_parallel_size", "2", "--parallel.sequence_parallel", "true"],
        ["--tensor_model_parallel_size=2", "--sequence_parallel=true"],
        ["--tp", "2", "--sequence_parallel", "yes"],
    ]
    cfgs = [load_config(None, s, environ={}) for s in spellings]
    assert all(c == cfgs[0] for c in cfgs)
    assert cfgs[0].parallel.tensor_model_parallel_size == 2 and cfgs[0].parallel.sequence_parallel is True


def test_dotted_and_list_and_dict_flags():
    cfg = load_config(None, ["--train.lr", "1e-5", "--dataset", "a#500", "b#500", "--val_dataset",
                             "--env", "NCCL_DEBUG=INFO", "HOME=/x y", "--rope_scaling",
                             '{"type": "yarn", "factor": 4.0}', "--recompute_granularity", "none",
                             "--extra_sbatch", "reservation=big"], environ={})
    assert cfg.train.lr == 1e-5 and cfg.data.dataset == ["a#500", "b#500"] and cfg.data.val_dataset == []
    assert cfg.slurm.env == {"NCCL_DEBUG": "INFO", "HOME": "/x y"}
    assert cfg.model.rope_scaling == {"type": "yarn", "factor": 4.0}
    assert cfg.train.recompute_granularity is None and cfg.slurm.extra_sbatch == ["reservation=big"]
    # "none" is a real choice for some fields and stays a string there
    assert load_config(None, ["--position_embedding_type", "none"], environ={}).model.position_embedding_type == "none"


def test_derived_defaults():
    cfg = load_config(None, ["--model", "/models/Qwen2.5-0.5B-Instruct/", "--torch_dtype", "float16",
                             "--train_iters", "50", "--save_interval", "25"], environ={})
    assert cfg.checkpoint.save == "megatron_output/Qwen2.5-0.5B-Instruct"
    assert cfg.train.lr == 1e-5 and cfg.train.lr_decay_iters == 50 and cfg.eval.eval_interval == 25
    # apply_query_key_layer_scaling is not derived from fp16 (Megatron-SWIFT's rule): no attention here applies it
    assert (cfg.precision.fp16, cfg.precision.bf16, cfg.precision.apply_query_key_layer_scaling) == (True, False, None)
    cfg = load_config(None, ["--bf16", "true"], environ={})
    assert (cfg.precision.fp16, cfg.precision.bf16) == (False, True) and cfg.checkpoint.save is None


def full_config() -> JobConfig:
    return load_config(None, [
        "--model", "m", "--dataset", "a#5", "b", "--system", 'He said "hi"\n\ttab \\ back', "--model_name", "小黄",
        "swift-robot", "--tensor_model_parallel_size", "2", "--sequence_parallel", "--recompute_granularity", "none",
        "--lr", "1e-5", "--min_lr", "1e-7", "--env", "A=1", "B=two words", "--setup", "module load cuda",
        "--rope_scaling", '{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1}', "--time", "1-00:00:00",
        "--initial_loss_scale", "65536", "--columns", '{"q": "query"}', "--bf16", "true",
    ], environ={"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1", "MASTER_PORT": "29500"})


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_dump_reload_round_trip(tmp_path, fmt):
    cfg = full_config()
    path = tmp_path / f"args.{fmt}"
    (dump_toml if fmt == "toml" else dump_json)(cfg, path)
    back = read_config(path)
    assert back == cfg
    assert load_config(path, environ={}) == cfg  # resolve/validate are idempotent on a resolved config
    # and it is the real format, readable by the standard parsers
    doc = tomllib.loads(path.read_text()) if fmt == "toml" else json.loads(path.read_text())
    assert doc["data"]["system"] == cfg.data.system and doc["train"]["lr"] == 1e-5


def test_default_config_round_trips(tmp_path):
    cfg = JobConfig()
    dump_toml(cfg, tmp_path / "d.toml")
    assert read_config(tmp_path / "d.toml") == cfg
    assert to_toml(cfg).count("[") >= len(SECTIONS)


def test_config_from_argv_splits_path(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[train]\nmicro_batch_size = 2\n")
    cfg = config_from_argv([str(p), "--global_batch_size", "8"], mode="pt", environ={})
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.mode) == (2, 8, "pt")
    assert config_from_argv(["--lr", "1e-4"], environ={}).train.lr == 1e-4


def test_config_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_argv(["job.toml", "--help"], mode="pt")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hpctrain pt") and "[train] mode, micro_batch_size" in out


def test_dumps_leave_out_keys_of_features_that_are_not_built(tmp_path):
    """args.json / config.toml never claim a setting that did not run (rlhf_type "dpo", streaming ...)."""
    cfg = full_config()
    dump_json(cfg, tmp_path / "args.json")
    dump_toml(cfg, tmp_path / "config.toml")
    doc = json.loads((tmp_path / "args.json").read_text())
    assert doc["rlhf"] == {} and "rlhf_type" not in (tmp_path / "config.toml").read_text()
    assert "streaming" not in doc["data"] and "padding_free" not in doc["data"] and "num_workers" in doc["data"]
    assert not [k for k in doc["tuner"] if k in ("freeze_llm", "freeze_parameters")] and "lora_rank" in doc["tuner"]
    assert load_config(tmp_path / "args.json", environ={}) == cfg  # and it reloads without a refusal
