"""The one HF config mapping (families.model_args): both transformers spellings, and refusals that
name the file, the key and the fix."""
import json
from pathlib import Path

import pytest
from tiny_hf import TINY, old_style

from hpctrain.model.build import model_args_from_hf
from hpctrain.model.families import HfConfigError, family_for, model_args, read_config_json
from hpctrain.model.mcore_config import check_tp, padded_vocab

ASSETS = Path(__file__).resolve().parents[2] / "hpctrain" / "assets" / "configs"
WHERE = "/models/m/config.json"


def test_qwen25_7b_config_map():
    cfg = json.loads((ASSETS / "qwen2.5-7b-instruct.config.json").read_text())
    a = model_args_from_hf(cfg)
    assert a["model_type"] == "qwen2" and a["add_qkv_bias"] and a["untie_embeddings_and_output_weights"]
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"]) == (28, 3584, 18944)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == (28, 4, 128)
    assert a["rotary_base"] == 1e6 and a["norm_epsilon"] == 1e-6 and a["torch_dtype"] == "bfloat16"
    assert a["padded_vocab_size"] == padded_vocab(152064) == 152064
    check_tp(a, 4)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=28"):
        check_tp(a, 8)


def test_qwen25_05b_tied():
    cfg = json.loads((ASSETS / "qwen2.5-0.5b-instruct.config.json").read_text())
    a = model_args_from_hf(cfg)
    assert not a["untie_embeddings_and_output_weights"] and a["num_query_groups"] == 2


def test_vocab_is_padded_only_where_tp_does_not_divide_it():
    assert [padded_vocab(300, tp) for tp in (1, 2, 3, 4, 8)] == [300, 300, 300, 300, 304]


def _configs(kind: str, tmp_path) -> tuple[dict, dict]:
    """(transformers 5 config.json dict, the same rewritten as 4.4x writes it) of a tiny ``kind``."""
    from transformers import LlamaConfig, Qwen2Config

    if kind == "llama3":
        cfg = LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=5e5, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, dtype="bfloat16")
    else:
        cfg = Qwen2Config(**TINY, tie_word_embeddings=kind == "qwen2_tied", rope_theta=1e6, dtype="bfloat16")
    path = tmp_path / f"{kind}.json"
    cfg.to_json_file(str(path))
    v5 = json.loads(path.read_text())
    return v5, old_style(path)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied", "llama3"])
def test_both_spellings_map_to_the_same_model(kind, tmp_path):
    v5, old = _configs(kind, tmp_path)
    assert "rope_parameters" in v5 and "dtype" in v5 and "rope_theta" not in v5 and "torch_dtype" not in v5
    assert "rope_theta" in old and "torch_dtype" in old and "rope_parameters" not in old
    a, b = model_args(v5, WHERE), model_args(old, WHERE)
    assert a == b
    assert a["rotary_base"] == (5e5 if kind == "llama3" else 1e6) and a["torch_dtype"] == "bfloat16"
    assert a["untie_embeddings_and_output_weights"] == (kind != "qwen2_tied")
    assert a["add_qkv_bias"] == kind.startswith("qwen2") and a["kv_channels"] == 16
    assert (a["rope_scaling"] or {}).get("factor") == (8.0 if kind == "llama3" else None)


LLAMA = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "nope", "rope_theta": 1e4}}, "rope_parameters.rope_type = 'nope' is unknown"),
    ({"rope_scaling": {"type": "nope"}}, "rope_scaling.type = 'nope' is unknown"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type = 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters.rope_type = 'linear' is not"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}}, "high_freq_factor"),
    ({"num_hidden_layers": None}, "no 'num_hidden_layers', which the model shape needs"),
    ({"hidden_size": 64.5}, "hidden_size = 64.5 is not a positive integer"),
    ({"num_hidden_layers": "two"}, "num_hidden_layers = 'two' is not a positive integer"),
    ({"num_attention_heads": True}, "num_attention_heads = True is not a positive integer"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}, "rope_theta = 10000 and rope_parameters.rope_theta = 500000 disagree"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps = 'small' is not a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes' is not true/false"),
    ({"dtype": "int8"}, "dtype = 'int8' cannot be trained"),
    ({"dtype": "bfloat16", "torch_dtype": "float16"}, "dtype = 'bfloat16' and torch_dtype = 'float16' disagree"),
    ({"attention_bias": True}, "attention_bias = true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture ['MistralForCausalLM']; supported: "
                                                "LlamaForCausalLM, Qwen2ForCausalLM"),
])
def test_refusals_name_the_file_and_the_key(change, message):
    with pytest.raises(HfConfigError) as e:
        model_args({**LLAMA, **change}, WHERE)
    assert message in str(e.value) and str(e.value).startswith(WHERE + ": "), str(e.value)
    assert "\n" not in str(e.value)


def test_qwen2_refuses_rope_scaling_and_sliding_window():
    qwen = dict(LLAMA, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(HfConfigError, match=r"rope_parameters asks for 'yarn' RoPE scaling"):
        model_args(dict(qwen, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), WHERE)
    with pytest.raises(HfConfigError, match="use_sliding_window = true"):
        model_args(dict(qwen, use_sliding_window=True), WHERE)


def test_defaults_when_keys_are_absent():
    a = model_args(LLAMA, WHERE)
    assert a["rotary_base"] == 10000.0 and a["torch_dtype"] is None and a["kv_channels"] == 16
    assert a["untie_embeddings_and_output_weights"] and a["rope_scaling"] is None
    assert family_for({"model_type": "qwen2"}).name == "qwen2"


def test_read_config_json_refuses_malformed_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(HfConfigError, match=rf"^{bad}: not valid JSON"):
        read_config_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(HfConfigError, match="holds a JSON list, not an object"):
        read_config_json(bad)
    with pytest.raises(HfConfigError, match="cannot read the model's config.json"):
        read_config_json(tmp_path / "absent.json")
