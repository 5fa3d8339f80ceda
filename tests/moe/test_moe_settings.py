"""Qwen3 / Qwen3-MoE config reading and the [moe] keys: each wired key reaches megatron-core's
TransformerConfig (or refuses with one line naming it), and impossible layouts are refused before a
model is built. Pure units: no process group."""
import json
from types import SimpleNamespace

import pytest
from tiny_hf import TINY, hf_model, old_style

from hpctrain.config import load_config
from hpctrain.config.errors import ConfigError
from hpctrain.config.moe_freq import parse_moe_layer_freq
from hpctrain.model.families import HfConfigError, model_args

WHERE = "/m/config.json"


def configs(kind: str, tmp_path) -> tuple[dict, dict]:
    """(config.json as transformers 5 writes it, the same rewritten as 4.x writes it)."""
    path = tmp_path / "config.json"
    hf_model(kind).config.to_json_file(str(path))
    return json.loads(path.read_text()), old_style(path)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_mixed"])
def test_both_spellings_map_to_the_same_model(kind, tmp_path):
    v5, old = configs(kind, tmp_path)
    assert ("num_local_experts" in v5) == kind.startswith("qwen3_moe") and "num_local_experts" not in old
    a, b = model_args(v5, WHERE), model_args(old, WHERE)
    a.pop("torch_dtype"), b.pop("torch_dtype")  # a bare config (no model) writes no dtype; old_style adds one
    assert a == b
    assert a["qk_layernorm"] is True and a["add_qkv_bias"] is False and a["rotary_base"] == 1e6
    assert a["kv_channels"] == (16 if kind.startswith("qwen3_moe") else 24)
    assert a["untie_embeddings_and_output_weights"] == (kind != "qwen3_tied")
    if kind.startswith("qwen3_moe"):
        assert (a["num_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (4, 2, 32)
        assert a["moe_layer_freq"] == ([0, 1] if kind.endswith("mixed") else 1)
        assert a["moe_router_pre_softmax"] == kind.endswith("mixed")  # norm_topk_prob false there
        assert a["moe_aux_loss_coeff"] == 0.01


QWEN3 = dict(architectures=["Qwen3ForCausalLM"], num_hidden_layers=4, hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
MOE = dict(QWEN3, architectures=["Qwen3MoeForCausalLM"], num_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=32)


def test_qwen3_head_dim_defaults_to_transformers_128():
    assert model_args(QWEN3, WHERE)["kv_channels"] == 128
    assert model_args(dict(QWEN3, head_dim=16), WHERE)["kv_channels"] == 16


def test_decoder_sparse_step_and_mlp_only_layers_follow_transformers():
    a = model_args(dict(MOE, decoder_sparse_step=2), WHERE)
    assert a["moe_layer_freq"] == [0, 1, 0, 1]  # HF: layer i is sparse when (i + 1) % step == 0
    assert model_args(dict(MOE, mlp_only_layers=[0, 3]), WHERE)["moe_layer_freq"] == [0, 1, 1, 0]
    assert model_args(dict(MOE, router_aux_loss_coef=0), WHERE)["moe_aux_loss_coeff"] == 0.0


@pytest.mark.parametrize("config, message", [
    (dict(QWEN3, attention_bias=True), "attention_bias = true is not supported"),
    (dict(QWEN3, use_sliding_window=True), "use_sliding_window = true"),
    (dict(QWEN3, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "'yarn' RoPE scaling"),
    (dict(MOE, num_experts_per_tok=9), "num_experts_per_tok = 9 > 8 experts"),
    (dict(MOE, mlp_only_layers=[0, 1, 2, 3]), "no layer is a MoE layer"),
    (dict(MOE, mlp_only_layers="0"), "mlp_only_layers = '0' is not a list"),
    (dict(MOE, num_local_experts=4), "num_experts = 8 and num_local_experts = 4 disagree"),
    (dict(MOE, shared_expert_intermediate_size=64), "shared experts (Qwen2-MoE) are not part"),
])
def test_refusals_name_the_file_and_the_key(config, message):
    with pytest.raises(HfConfigError) as e:
        model_args(config, WHERE)
    assert message in str(e.value) and str(e.value).startswith(WHERE + ": ") and "\n" not in str(e.value)


def test_moe_layer_freq_forms_are_parsed_never_evaluated():
    assert parse_moe_layer_freq("([0]*1+[1]*3)") == [0, 1, 1, 1]
    assert parse_moe_layer_freq("[0, 1]") == [0, 1] and parse_moe_layer_freq("2") == 2
    for bad in ("__import__('os')", "[2]*3", "0", "[]"):
        with pytest.raises(ConfigError, match="moe_layer_freq"):
            parse_moe_layer_freq(bad)


def moe_cfg(*flags):
    from hpctrain.train.model_setup import moe_config
    cfg = load_config(None, ["--num_experts", "8", "--moe_router_topk", "2", "--moe_ffn_hidden_size", "32",
                             "--moe_aux_loss_coeff", "0.01", *flags], environ={})
    return moe_config(cfg)


def test_each_moe_key_reaches_the_transformer_config():
    base = moe_cfg()
    assert (base["num_moe_experts"], base["moe_router_topk"], base["moe_ffn_hidden_size"]) == (8, 2, 32)
    assert base["moe_grouped_gemm"] is True and base["moe_token_dispatcher_type"] == "alltoall"
    assert base["moe_router_dtype"] == "fp32" and base["moe_aux_loss_coeff"] == 0.01
    assert base["moe_router_pre_softmax"] is False and base["moe_layer_freq"] == 1
    assert base["expert_model_parallel_size"] == 1 and base["expert_tensor_parallel_size"] is None
    for flags, key, want in [
        (["--moe_grouped_gemm", "false"], "moe_grouped_gemm", False),
        (["--moe_token_dispatcher_type", "allgather"], "moe_token_dispatcher_type", "allgather"),
        (["--moe_router_dtype", "none"], "moe_router_dtype", None),
        (["--moe_router_dtype", "fp64"], "moe_router_dtype", "fp64"),
        (["--moe_router_pre_softmax", "true"], "moe_router_pre_softmax", True),
        (["--moe_layer_freq", "[0,1,1,1]"], "moe_layer_freq", [0, 1, 1, 1]),
        (["--moe_router_load_balancing_type", "none"], "moe_aux_loss_coeff", 0.0),
        (["--expert_model_parallel_size", "2"], "expert_model_parallel_size", 2),
        (["--expert_tensor_parallel_size", "1"], "expert_tensor_parallel_size", 1),
    ]:
        assert moe_cfg(*flags)[key] == want, flags


def test_a_dense_model_has_no_moe_config():
    from hpctrain.train.model_setup import moe_config
    assert moe_config(load_config(None, [], environ={})) == {}


@pytest.mark.parametrize("flags, message", [
    (["--moe_token_dispatcher_type", "flex"], "flex dispatcher needs DeepEP"),
    (["--moe_router_load_balancing_type", "sinkhorn"], "Sinkhorn routing is not built"),
    (["--num_experts", "6", "--expert_model_parallel_size", "4"], "does not divide num_experts = 6"),
    (["--expert_model_parallel_size", "2", "--moe_token_dispatcher_type", "allgather"], "use alltoall"),
    (["--moe_layer_freq", "[0,2]"], "moe_layer_freq"),
    (["--moe_z_loss_coeff", "0.1"], "moe_z_loss_coeff is not supported yet"),
    (["--multi_latent_attention", "true"], "Multi-Latent Attention (DeepSeek) is not built"),
])
def test_refused_at_config_time(flags, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, flags, environ={})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_expert_layout_must_fit_the_processes():
    with pytest.raises(ConfigError, match=r"expert_tensor_parallel\(2\) \* expert_model_parallel\(2\) \* pp\(1\) = 4 "
                                          r"does not divide the 2 process"):
        load_config(None, ["--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "2",
                           "--train_iters", "1"], environ={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                                          "MASTER_ADDR": "x", "MASTER_PORT": "1"},
                    on_this_machine=True)


def _layout_cfg(**moe):
    p = SimpleNamespace(tensor_model_parallel_size=moe.pop("tp", 1), sequence_parallel=moe.pop("sp", False),
                        context_parallel_size=moe.pop("cp", 1))
    m = dict(num_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2, expert_model_parallel_size=1,
             expert_tensor_parallel_size=None)
    m.update(moe)
    return SimpleNamespace(moe=SimpleNamespace(**m), parallel=p, train=SimpleNamespace(cuda_graph_impl="none"))


@pytest.mark.parametrize("cfg, message", [
    (_layout_cfg(expert_model_parallel_size=3), "does not divide num_experts = 8"),
    (_layout_cfg(expert_tensor_parallel_size=3), "does not divide moe_ffn_hidden_size = 32"),
    (_layout_cfg(tp=2), "needs sequence_parallel = true"),
    (_layout_cfg(cp=2), "context_parallel_size > 1 with a MoE model"),
    (_layout_cfg(moe_router_topk=9), "moe_router_topk = 9 > num_experts = 8"),
    (_layout_cfg(num_experts=None, expert_model_parallel_size=2), "need a MoE model"),
])
def test_moe_layouts_refused_once_config_json_is_read(cfg, message):
    from hpctrain.train.model_source import check_moe_layout
    with pytest.raises(ConfigError, match=message):
        check_moe_layout(cfg)


def test_moe_keys_on_a_dense_model_are_refused(tmp_path):
    from hpctrain.train.model_source import fill_model_fields
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN3, **{"dtype": "float32"})))
    cfg = load_config(None, ["--model", str(tmp_path), "--num_experts", "4"], environ={})
    with pytest.raises(ConfigError, match="describes a dense 'qwen3' model; drop the \\[moe\\] keys"):
        fill_model_fields(cfg)


def test_config_json_fills_the_moe_fields_and_a_set_field_wins(tmp_path):
    from hpctrain.train.model_source import fill_model_fields
    (tmp_path / "config.json").write_text(json.dumps(dict(MOE, mlp_only_layers=[0], dtype="float32")))
    cfg = load_config(None, ["--model", str(tmp_path), "--moe_router_topk", "4"], environ={})
    fill_model_fields(cfg)
    assert cfg.moe.num_experts == 8 and cfg.moe.moe_ffn_hidden_size == 32
    assert json.loads(cfg.moe.moe_layer_freq) == [0, 1, 1, 1] and cfg.moe.moe_aux_loss_coeff == 0.001
    assert cfg.moe.moe_router_topk == 4  # set by the user: wins over config.json's 2
    assert cfg.model.qk_layernorm is True and cfg.model.kv_channels == 128


def test_mfu_counts_the_active_parameters_of_a_moe_model():
    """Qwen3-30B-A3B's shape: ~3.3B active parameters per token of ~30B, so the model FLOPs per token
    are those of ~3B params (6 x active non-embedding + output layer + attention), not of 30B."""
    from hpctrain.train.logger import flops_per_token
    flags = ["--num_layers", "48", "--hidden_size", "2048", "--num_attention_heads", "32", "--num_query_groups", "4",
             "--kv_channels", "128", "--padded_vocab_size", "151936", "--ffn_hidden_size", "6144", "--swiglu", "true"]
    dense = load_config(None, flags, environ={})
    moe = load_config(None, flags + ["--num_experts", "128", "--moe_router_topk", "8", "--moe_ffn_hidden_size",
                                     "768"], environ={})
    h, L = 2048, 48
    attn = h * 32 * 128 * 2 + 2 * h * 4 * 128
    want = 6 * L * (attn + 8 * 3 * h * 768 + h * 128) + 6 * h * 151936 + 6 * L * h * 4096
    assert flops_per_token(moe, 4096) == want
    assert flops_per_token(dense, 4096) == 6 * L * (attn + 3 * h * 6144) + 6 * h * 151936 + 6 * L * h * 4096
    half = load_config(None, flags + ["--num_experts", "128", "--moe_router_topk", "8", "--moe_ffn_hidden_size",
                                      "768", "--moe_layer_freq", "2"], environ={})
    assert flops_per_token(half, 4096) == (want + flops_per_token(dense, 4096)) / 2
