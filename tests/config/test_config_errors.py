"""Actionable errors: unknown keys with a suggestion, bad types, contradictions, bad TOML."""
import pytest

from hpctrain.config import ConfigError, load_config


def err(argv=(), path=None, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(argv), environ={}, **kw)
    return str(e.value)


def test_unknown_flat_flag_suggests_and_lists_section():
    msg = err(["--lr_warmup_iter", "1"])
    assert "unknown key 'lr_warmup_iter'" in msg
    assert "Did you mean 'lr_warmup_iters' (in [train])?" in msg
    assert "Valid keys in [train]:" in msg and "min_lr" in msg


def test_unknown_dotted_key_and_section():
    msg = err(["--train.micro_batch", "2"])
    assert "'train.micro_batch'" in msg and "Did you mean 'train.micro_batch_size'?" in msg
    msg = err(["--trian.lr", "1e-5"])
    assert "unknown section 'trian'" in msg and "Did you mean 'train'?" in msg


def test_key_in_wrong_section_says_where_it_belongs():
    msg = err(["--train.save", "out"])
    assert "belongs in [checkpoint]" in msg


def test_unknown_toml_key_names_file_and_line(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[train]\nlr = 1e-5\nglobal_batch = 32\n")
    msg = err(path=p)
    assert f"{p}:3:" in msg and "'train.global_batch'" in msg and "global_batch_size" in msg


def test_unknown_toml_section(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[trainig]\nlr = 1e-5\n")
    msg = err(path=p)
    assert "unknown section [trainig]" in msg and "Did you mean [train]?" in msg


def test_bad_toml_syntax_names_file_and_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlr = 1e-5\nmicro_batch_size = = 2\n")
    msg = err(path=p)
    assert msg.startswith(f"{p}:3: invalid TOML")


def test_missing_file():
    assert "not found" in err(path="/nonexistent/job.toml")


@pytest.mark.parametrize("argv,needles", [
    (["--micro_batch_size", "four"], ["--micro_batch_size", "'four'", "int"]),
    (["--micro_batch_size", "2.5"], ["'2.5'", "whole number"]),
    (["--lr", "fast"], ["--lr", "'fast'", "float"]),
    (["--finetune", "maybe"], ["--finetune", "'maybe'", "true or false"]),
    (["--micro_batch_size", "1", "2"], ["takes one value", "missing '--'"]),
    (["--rope_scaling", "{bad json"], ["--rope_scaling", "not valid JSON"]),
])
def test_bad_cli_types(argv, needles):
    msg = err(argv)
    for n in needles:
        assert n in msg, (n, msg)


def test_bad_toml_types(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[train]\nmicro_batch_size = "4"\n')
    msg = err(path=p)
    assert f"{p}:2: key 'train.micro_batch_size'" in msg and "'4'" in msg and "int" in msg
    p.write_text('[parallel]\nsequence_parallel = 1\n')
    assert "true or false" in err(path=p)


def test_bad_choice_lists_choices():
    msg = err(["--recompute_granularity", "partial"])
    assert "'partial' is not one of the choices: full, selective" in msg
    msg = err(["--recompute_modules", "core_attn", "everything"])
    assert "'everything'" in msg and "mla_up_proj" in msg


@pytest.mark.parametrize("argv,needle", [
    (["--recompute_method", "uniform"], "needs train.recompute_granularity = 'full'"),
    (["--recompute_granularity", "full"], "needs train.recompute_method"),
    (["--recompute_num_layers", "2"], "recompute_num_layers = 2 needs"),
    (["--sequence_parallel", "true"], "needs tensor_model_parallel_size > 1"),
    (["--micro_batch_size", "3", "--global_batch_size", "16"], "multiple of train.micro_batch_size (3)"),
    (["--lr_warmup_iters", "10", "--lr_warmup_fraction", "0.1"], "both set"),
    (["--fp16", "true", "--bf16", "true"], "both true"),
    (["--torch_dtype", "bfloat16", "--fp16", "true"], "contradicts"),
    (["--lr", "1e-5", "--min_lr", "1e-4"], "larger than train.lr"),
    (["--virtual_pipeline_model_parallel_size", "2"], "needs pipeline_model_parallel_size > 1"),
    (["--overlap_param_gather", "true"], "overlap_grad_reduce"),
    (["--micro_batch_size", "0"], "must be >= 1"),
    (["--model_name", "a", "b", "c"], "one or two values"),
    (["--time", "4 hours"], "not a Slurm time"),
    (["--lr_warmup_iters", "10", "--train_iters", "10"], "must end before the decay"),
    (["--lr_decay_style", "WSD", "--train_iters", "10"], "needs train.lr_wsd_decay_iters"),
    (["--override_opt_param_scheduler", "--use_checkpoint_opt_param_scheduler"], "not both"),
    (["--ckpt_format", "torch"], "set no_save_optim = true and no_save_rng = true"),
    (["--group_query_attention", "false", "--num_query_groups", "2", "--num_attention_heads", "4"],
     "one KV head per query head"),
    (["--dataset", "swift/self-cognition#500"], "rows need model_name: pass --model_name"),
    (["--dataset", "data/self_cognition.jsonl", "--model_name", "bot"], "rows need model_author"),
])
def test_contradictions_refused_with_reason(argv, needle):
    assert needle in err(argv)


@pytest.mark.parametrize("argv,needle", [
    (["--to_hf", "true"], "needs --mcore_model"),
    (["--to_mcore", "true", "--to_hf", "true", "--model", "m"], "both true"),
])
def test_export_contradictions(argv, needle):
    assert needle in err(argv, mode="export")


@pytest.mark.parametrize("mode", ["sft", "pt"])
def test_export_keys_refused_by_training_commands(mode):
    msg = err(["--output_dir", "out"], mode=mode)
    assert "export.output_dir = 'out' is an option of `hpctrain export`" in msg and "--save" in msg
    assert "to_hf" in err(["--to_hf", "true"], mode=mode)


def test_subcommand_sets_the_mode(tmp_path):
    assert load_config(None, ["--train.mode", "pt"], mode="pt", environ={}).train.mode == "pt"
    assert "the command is `hpctrain sft`" in err(["--train.mode", "pt"], mode="sft")


def test_nproc_more_than_visible_gpus():
    with pytest.raises(ConfigError, match="lists only 2 GPU"):
        load_config(None, [], environ={"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ConfigError, match="environment variable NPROC_PER_NODE"):
        load_config(None, [], environ={"NPROC_PER_NODE": "two"})


@pytest.mark.parametrize("argv", [["--moe_z_loss_coeff", "0.1"], ["--freeze_parameters", "x"], ["--fp8_format", "e4m3"],
                                  ["--wandb_project", "x"], ["--use_precision_aware_optimizer", "true"],
                                  ["--rlhf_type", "dpo"], ["--freeze_llm", "false"], ["--streaming", "false"]])
def test_unsupported_features_refused_whatever_the_value(argv):
    """Setting a key of a feature that is not built is refused, even to its default (rlhf_type's only
    choice "dpo", freeze_llm false, streaming false)."""
    msg = err(argv)
    assert msg.startswith(f"command-line flag {argv[0]}:") and "is not supported yet" in msg, msg
    assert argv[0].lstrip("-") in msg


def test_unsupported_key_in_a_file_names_file_and_line(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[train]\nlr = 1e-5\n\n[rlhf]\nrlhf_type = "dpo"\n')
    msg = err(path=p)
    assert msg.startswith(f"{p}:5: key 'rlhf.rlhf_type': rlhf.rlhf_type is not supported yet: [rlhf] is not built")


def test_positional_and_value_errors():
    from hpctrain.config import config_from_argv

    with pytest.raises(ConfigError, match="only one config file"):
        config_from_argv(["a.toml", "b.toml"], environ={})
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(None, ["--lr"], environ={})
    with pytest.raises(ConfigError, match="unknown mode"):
        load_config(None, [], mode="train", environ={})
