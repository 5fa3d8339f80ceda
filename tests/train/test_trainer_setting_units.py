"""Settings that reach megatron-core's TransformerConfig (what GPTModel is built from) or the process
groups, checked without training: group_query_attention, no_initialization, calculate_per_token_loss,
ddp_timeout / distributed_timeout_minutes."""
import datetime
import json

import pytest
from trainer_worker import TINY

from hpctrain.config import load_config
from hpctrain.train import dist, model_setup, model_source

QWEN2_SHAPE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 2,
               "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "tie_word_embeddings": False}


def transformer_config(*flags, config_json=None, tmp_path=None):
    argv = list(flags)
    if config_json is not None:
        (tmp_path / "config.json").write_text(json.dumps(config_json))
        argv += ["--model", str(tmp_path)]
    cfg = load_config(None, argv, mode="sft", environ={})
    model_source.fill_model_fields(cfg)
    return model_setup.transformer_config(cfg, "cpu")


def test_group_query_attention_false_means_one_kv_head_per_query_head(tmp_path):
    """config.json says 2 KV heads; group_query_attention = false builds multi-head attention (4)."""
    assert transformer_config(config_json=QWEN2_SHAPE, tmp_path=tmp_path).num_query_groups == 2
    assert transformer_config("--group_query_attention", "true", config_json=QWEN2_SHAPE,
                              tmp_path=tmp_path).num_query_groups == 2
    assert transformer_config("--group_query_attention", "false", config_json=QWEN2_SHAPE,
                              tmp_path=tmp_path).num_query_groups == 4


def test_no_initialization_skips_the_random_init_only_when_weights_are_loaded():
    loaded = transformer_config(*TINY, "--load", "/ckpt")
    assert loaded.init_method is model_setup._no_init and loaded.output_layer_init_method is model_setup._no_init
    assert loaded.embedding_init_method is model_setup._no_init
    assert loaded.perform_initialization  # megatron-core tags the TP-split weights only inside its init
    for flags in ([], ["--load", "/ckpt", "--no_initialization", "false"]):
        assert transformer_config(*TINY, *flags).init_method is not model_setup._no_init, flags


def test_calculate_per_token_loss_reaches_megatron():
    assert transformer_config(*TINY).calculate_per_token_loss is True


def test_ddp_timeout_wins_over_distributed_timeout_minutes():
    p = load_config(None, ["--distributed_timeout_minutes", "7"], environ={}).parallel
    assert dist.group_timeout(p) == datetime.timedelta(minutes=7)
    p = load_config(None, ["--distributed_timeout_minutes", "7", "--ddp_timeout", "90"], environ={}).parallel
    assert dist.group_timeout(p) == datetime.timedelta(seconds=90)
    assert dist.group_timeout(load_config(None, [], environ={}).parallel) == datetime.timedelta(minutes=60)
