"""Planner arithmetic and refusals: every message carries its formula."""
from pathlib import Path

import pytest

from hpctrain.plan.layout import Batch, Cluster, Layout, check_layout, make_layout, stage_layers
from hpctrain.plan.memory import GIB, Training
from hpctrain.plan.planner import auto_plan, plan_layout
from hpctrain.plan.shape import ModelShape, load_shape

CONFIGS = Path(__file__).resolve().parents[2] / "hpctrain" / "assets" / "configs"


class _ModelCfg:
    def __init__(self, **kw):
        self.model, self.load = kw.pop("model", None), kw.pop("load", None)
        for k, v in kw.items():
            setattr(self, k, v)

    def __getattr__(self, name):  # every other [model] field unset
        return None


@pytest.fixture(scope="module")
def qwen05():
    return load_shape(_ModelCfg(model=str(CONFIGS / "qwen2.5-0.5b-instruct.config.json")))


@pytest.fixture(scope="module")
def qwen7():
    return load_shape(_ModelCfg(model=str(CONFIGS / "qwen2.5-7b-instruct.config.json")))


def problems(shape, cluster, tp, pp=1, cp=1, vpp=None, **batch):
    check = make_layout(cluster, tp, pp, cp, vpp)
    if check.layout is None:
        return check.problems
    return check_layout(shape, cluster, check.layout, Batch(**batch)).problems


def test_shape_from_hf_config(qwen05):
    assert (qwen05.num_layers, qwen05.hidden_size, qwen05.ffn_hidden_size) == (24, 896, 4864)
    assert (qwen05.num_attention_heads, qwen05.num_query_groups, qwen05.kv_channels) == (14, 2, 64)
    assert qwen05.vocab_size == 151936 and qwen05.add_qkv_bias and not qwen05.untie_embeddings_and_output_weights


def test_explicit_fields_override_and_missing_shape_is_explained(qwen05):
    s = load_shape(_ModelCfg(model=str(CONFIGS / "qwen2.5-0.5b-instruct.config.json"), num_layers=12))
    assert s.num_layers == 12 and s.hidden_size == 896
    with pytest.raises(ValueError, match="num_layers, hidden_size, num_attention_heads, vocab_size"):
        load_shape(_ModelCfg())


def test_world_not_divisible_names_the_formula(qwen7):
    msg = problems(qwen7, Cluster(6, 8), tp=5)
    assert msg == ["tp(5) * pp(1) * cp(1) * dp(?) != 48 GPUs (6 nodes x 8): 48 is not divisible by tp*pp*cp = 5"]


def test_dp_is_derived(qwen7):
    check = make_layout(Cluster(6, 8), 2, 4, 1)
    assert check.layout == Layout(2, 4, 1, 6)


def test_heads_and_query_groups_by_tp(qwen05):
    msgs = problems(qwen05, Cluster(1, 4), tp=4, global_batch_size=4)
    assert any("num_attention_heads(14) % tp(4) = 2 != 0" in m for m in msgs)
    assert any("num_query_groups(2) % tp(4) = 2 != 0" in m for m in msgs)
    assert problems(qwen05, Cluster(1, 2), tp=2, global_batch_size=4) == []


def test_layers_by_pp_and_virtual_stages(qwen05):
    assert any("num_layers(24) % pp(5) = 4 != 0" in m for m in problems(qwen05, Cluster(5, 1), tp=1, pp=5,
                                                                          global_batch_size=5))
    msgs = problems(qwen05, Cluster(4, 1), tp=1, pp=4, vpp=4, global_batch_size=4)
    assert any("num_layers(24) % pp(4) * vpp(4) = 8 != 0" in m for m in msgs)
    assert problems(qwen05, Cluster(4, 1), tp=1, pp=4, vpp=2, global_batch_size=4) == []


def test_custom_first_last_stage(qwen05):
    assert stage_layers(24, 4, 4, 4) == [4, 8, 8, 4]
    ok = problems(qwen05, Cluster(4, 1), tp=1, pp=4, global_batch_size=4,
                  decoder_first_pipeline_num_layers=4, decoder_last_pipeline_num_layers=4)
    assert ok == []
    bad = problems(qwen05, Cluster(4, 1), tp=1, pp=4, global_batch_size=4,
                   decoder_first_pipeline_num_layers=5, decoder_last_pipeline_num_layers=4)
    assert any("(num_layers(24) - first(5) - last(4)) % middle stages(2)" in m for m in bad)


def test_seq_length_by_two_cp(qwen05):
    msgs = problems(qwen05, Cluster(2, 8), tp=1, cp=16, seq_length=1000, global_batch_size=1)
    assert any("seq_length(1000) % (2 * cp(16)) = 8 != 0" in m for m in msgs)


def test_vocab_by_tp():
    s = ModelShape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=2,
                   vocab_size=49153, kv_channels=4)
    assert any("vocab_size(49153) % tp(2) = 1 != 0" in m for m in problems(s, Cluster(1, 2), tp=2,
                                                                           global_batch_size=2))


def test_global_batch_by_micro_batch_times_dp(qwen05):
    msgs = problems(qwen05, Cluster(1, 4), tp=1, micro_batch_size=1, global_batch_size=10)
    assert msgs == ["global_batch_size(10) % (micro_batch_size(1) * dp(4)) = 2 != 0"]


def test_auto_picks_smallest_tp_then_pp_that_fits(qwen7):
    cluster, batch, tr = Cluster(1, 8), Batch(micro_batch_size=2, global_batch_size=16, seq_length=8192), Training()
    gpu = 48 * GIB
    plan = auto_plan(qwen7, cluster, 1, batch, tr, gpu)
    assert plan.memory.fits
    tp, pp = plan.layout.tp, plan.layout.pp
    for t in (1, 2, 4, 8):
        for p in (1, 2, 4, 8):
            if (t, p) >= (tp, pp) or cluster.world_size % (t * p):
                continue
            check = make_layout(cluster, t, p, 1)
            try:
                smaller = plan_layout(qwen7, cluster, check, batch, tr, gpu)
            except ValueError:
                continue  # invalid layout
            assert not smaller.memory.fits, (t, p)
    assert (tp, pp) == (4, 2)  # 7B, 8k tokens, 44 GiB usable: TP=4 needs ~51 GiB, TP=4 x PP=2 ~42 GiB


def test_plan_cli_refusal_exit_code_and_message(capsys):
    from hpctrain.plan.cli import run

    rc = run(["--nodes", "6", "--gpus-per-node", "8", "--model", str(CONFIGS / "qwen2.5-7b-instruct.config.json"),
              "--tensor_model_parallel_size", "5"])
    assert rc == 2
    assert "tp(5) * pp(1) * cp(1) * dp(?) != 48 GPUs (6 nodes x 8)" in capsys.readouterr().err


def test_plan_cli_prints_layout_map_and_memory(capsys):
    from hpctrain.plan.cli import run

    rc = run(["--nodes", "2", "--gpus-per-node", "4", "--model", str(CONFIGS / "qwen2.5-0.5b-instruct.config.json"),
              "--tensor_model_parallel_size", "2", "--global_batch_size", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "TP=2 PP=1 CP=1 DP=4 on 8 GPUs (2 nodes x 4)" in out
    assert "node 1: gpu0:r4(tp0 cp0 dp2 pp0)" in out
    assert "TP    groups: [0, 1] [2, 3] [4, 5] [6, 7]" in out
    assert "memory per GPU" in out
