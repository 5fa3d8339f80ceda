"""Model families as data: HF config -> Megatron model args; refusals list what is supported."""
import json
from pathlib import Path

import pytest

from hpctrain.model.build import model_args_from_hf
from hpctrain.model.families import family_for
from hpctrain.model.mcore_config import check_tp, padded_vocab

ASSETS = Path(__file__).resolve().parents[2] / "hpctrain" / "assets" / "configs"


def test_qwen25_7b_config_map():
    cfg = json.loads((ASSETS / "qwen2.5-7b-instruct.config.json").read_text())
    a = model_args_from_hf(cfg)
    assert a["model_type"] == "qwen2" and a["add_qkv_bias"] and a["untie_embeddings_and_output_weights"]
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"]) == (28, 3584, 18944)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == (28, 4, 128)
    assert a["rotary_base"] == 1e6 and a["norm_epsilon"] == 1e-6
    assert a["padded_vocab_size"] == padded_vocab(152064) == 152064
    check_tp(a, 4)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=28"):
        check_tp(a, 8)


def test_qwen25_05b_tied():
    cfg = json.loads((ASSETS / "qwen2.5-0.5b-instruct.config.json").read_text())
    a = model_args_from_hf(cfg)
    assert not a["untie_embeddings_and_output_weights"] and a["num_query_groups"] == 2


def test_llama31_rope_scaling_and_refusals():
    base = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64,
                intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    a = model_args_from_hf(dict(base, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert a["rope_scaling"]["factor"] == 8.0 and a["rotary_base"] == 5e5 and not a["add_qkv_bias"]
    assert a["padded_vocab_size"] == 384
    with pytest.raises(ValueError, match="high_freq_factor"):
        model_args_from_hf(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                    "high_freq_factor": 2.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        model_args_from_hf(dict(base, attention_bias=True))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        family_for({"architectures": ["MistralForCausalLM"]})
