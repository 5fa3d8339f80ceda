"""The [tuner] LoRA keys: what each one selects, and the combinations refused at config time (one line,
exit 2 through the CLI)."""
import pytest

from hpctrain.config import ConfigError, load_config
from hpctrain.model.lora import lora_settings
from hpctrain.model.lora.apply import check_uniform

LORA = ["--train_type", "lora"]


def cfg(*argv, mode="sft"):
    return load_config(None, list(argv), mode=mode, environ={})


def refused(*argv, mode="sft") -> str:
    with pytest.raises(ConfigError) as e:
        cfg(*argv, mode=mode)
    return str(e.value)


@pytest.mark.parametrize("targets, want", [
    (["all-linear"], {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}),
    (["q_proj", "k_proj", "v_proj"], {"linear_qkv"}),
    (["gate_proj", "up_proj", "down_proj", "o_proj"], {"linear_fc1", "linear_fc2", "linear_proj"}),
    (["linear_fc2", "linear_qkv"], {"linear_fc2", "linear_qkv"}),
])
def test_target_modules_hf_and_megatron_names(targets, want):
    s = lora_settings(cfg(*LORA, "--target_modules", *targets).tuner)
    assert s.targets == want
    assert s.wants("decoder.layers.5.mlp.linear_fc2") == ("linear_fc2" in want)


def test_scaling_rank_alpha_rslora():
    assert lora_settings(cfg(*LORA, "--lora_rank", "4", "--lora_alpha", "8").tuner).scaling == 2.0
    assert lora_settings(cfg(*LORA, "--lora_rank", "4", "--lora_alpha", "8", "--use_rslora", "true").tuner).scaling == 4.0


@pytest.mark.parametrize("argv, needle", [
    (LORA + ["--target_modules", "q_proj"], "fuses q_proj + k_proj + v_proj"),
    (LORA + ["--target_modules", "gate_proj", "down_proj"], "without up_proj"),
    (LORA + ["--target_modules", "lm_head"], "unknown module 'lm_head'"),
    (LORA + ["--target_modules", "all-linear", "q_proj"], "give it alone"),
    (LORA + ["--target_regex", "("], "not a regular expression"),
    (LORA + ["--modules_to_save", "norm"], "embed_tokens (word_embeddings) and lm_head"),
    (LORA + ["--lora_rank", "0"], "lora_rank = 0"),
    (LORA + ["--lora_dropout", "1.0"], "lora_dropout"),
    (LORA + ["--adapters", "a", "b"], "one adapter folder"),
    (LORA + ["--transformer_impl", "transformer_engine"], "transformer_impl = 'local'"),
    (LORA + ["--ckpt_format", "torch", "--no_save_optim", "true", "--no_save_rng", "true"], "torch_dist"),
    (["--save_safetensors", "true", "--ckpt_format", "torch", "--no_save_optim", "true", "--no_save_rng", "true"],
     "save_safetensors needs ckpt_format"),
    (["--lora_rank", "16"], "train_type = 'full'"),
    (["--target_modules", "q_proj", "k_proj", "v_proj"], "set --train_type lora"),
    (["--adapter_load", "x"], "--adapters PEFT_DIR"),
])
def test_refused_at_config_time(argv, needle):
    assert needle in refused(*argv)


def test_merge_lora_belongs_to_export():
    assert "option of `hpctrain export`" in refused("--merge_lora", "true")


def test_target_regex_must_cover_every_layer_or_none():
    ok = lora_settings(cfg(*LORA, "--target_regex", r"decoder\.layers\.\d+\.mlp\.linear_fc[12]").tuner)
    check_uniform(ok, 4)
    assert ok.wants("decoder.layers.3.mlp.linear_fc1") and not ok.wants("decoder.layers.3.self_attention.linear_qkv")
    some = lora_settings(cfg(*LORA, "--target_regex", r"decoder\.layers\.[01]\..*linear_qkv").tuner)
    with pytest.raises(ConfigError, match="some layers only"):
        check_uniform(some, 4)
    with pytest.raises(ConfigError, match="selects no linear"):
        check_uniform(lora_settings(cfg(*LORA, "--target_regex", "nothing").tuner), 4)


def test_modules_to_save_refused_with_tied_embeddings():
    t = cfg(*LORA, "--modules_to_save", "embed_tokens").tuner
    assert lora_settings(t, tied=False).modules_to_save == ("word_embeddings",)
    with pytest.raises(ConfigError, match="tied embeddings"):
        lora_settings(t, tied=True)


def test_a_refusal_through_the_cli_is_one_line_exit_2(capsys):
    from hpctrain import cli

    assert cli.main(["sft", "--train_type", "lora", "--target_modules", "v_proj"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k_proj" in err[0], err


def test_cuda_graph_is_refused_with_lora():
    assert "not built for train_type lora" in refused(*LORA, "--cuda_graph_impl", "local", "--lora_dropout", "0")


def test_lora_on_a_moe_model_is_refused_before_any_adapter_is_made():
    """The adapters wrap the dense TP linears only: a config.json with experts is refused at start-up."""
    from hpctrain.train.model_setup import apply_tuner

    with pytest.raises(ConfigError, match="train_type lora is not built for MoE models"):
        apply_tuner(cfg(*LORA), chunks=[], moe=True)
    apply_tuner(cfg(), chunks=[], moe=True)  # train_type full: nothing to refuse


def test_sft_adapters_folder_checked_before_anything_starts(tmp_path, capsys):
    from hpctrain import cli

    from tiny_hf import make_tiny

    hf = make_tiny("qwen2", tmp_path / "hf", tokenizer="bytes")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert cli.main(["sft", "--model", str(hf), "--train_type", "lora", "--adapters", str(tmp_path / "empty"),
                     "--dataset", "swift/self-cognition#4", "--model_name", "x", "--model_author", "y",
                     "--train_iters", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a PEFT adapter folder" in err[0], err
