"""`hpctrain plan` for Qwen3-MoE: the shape from config.json (experts, MoE layers), EP/ETP checks with
the formula, total vs active parameters, and a memory estimate whose expert part shrinks with EP."""
import json

import pytest

from hpctrain.config import load_config
from hpctrain.plan.layout import Cluster, LayoutError
from hpctrain.plan.planner import make_plan
from hpctrain.plan.report import format_plan, plan_dict

# Qwen3-30B-A3B's published config.json (the shape only)
A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
           num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
           num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1e6,
           rms_norm_eps=1e-6, torch_dtype="bfloat16", router_aux_loss_coef=0.001, max_position_embeddings=40960)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(A3B))
    return tmp_path


def plan(model_dir, *flags, nodes=2):
    cfg = load_config(None, ["--model", str(model_dir), "--micro_batch_size", "1", "--global_batch_size", "16",
                             "--max_length", "4096", *flags], environ={})
    return make_plan(cfg, Cluster(nodes, 8), gpu_memory_gib=80)


def test_a3b_has_30b_params_and_3b_active(model_dir):
    p = plan(model_dir, "--expert_model_parallel_size", "8")
    d = plan_dict(p)
    assert 30.0e9 < d["params"]["total"] < 31.0e9 and 3.2e9 < d["params"]["active"] < 3.5e9
    text = format_plan(p)
    assert "MoE: 48 of 48 layers, 128 experts (top-8, ffn 768) over EP 8 x ETP 1" in text and "EP=8" in text


def test_expert_parallel_shrinks_the_expert_memory(model_dir):
    m1 = plan(model_dir, "--pipeline_model_parallel_size", "2").memory
    m8 = plan(model_dir, "--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "8").memory
    assert m8.params < m1.params / 4  # the experts are ~95% of the weights
    assert m8.total < m1.total


def test_impossible_expert_layouts_name_the_rule(model_dir):
    with pytest.raises(LayoutError, match=r"num_experts\(128\) % ep\(3\)"):
        plan(model_dir, "--expert_model_parallel_size", "3", nodes=3)
    with pytest.raises(LayoutError, match=r"world\(8\) % \(pp\(1\) \* ep\(16\) \* etp\(1\)\) != 0"):
        plan(model_dir, "--expert_model_parallel_size", "16", nodes=1)
