"""Memory estimate against hand-computed cases (formulas in hpctrain/plan/memory.py)."""
import json
from pathlib import Path

from hpctrain.plan.layout import Batch, Layout
from hpctrain.plan.memory import GIB, Training, estimate, stage_params
from hpctrain.plan.shape import ModelShape, shape_fields_from_hf

CONFIGS = Path(__file__).resolve().parents[2] / "hpctrain" / "assets" / "configs"
# h=8, a=2, g=2, d=4, f=16, V=32, 2 layers, SwiGLU, RMSNorm, tied embeddings, no linear biases.
TINY = ModelShape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=2,
                  vocab_size=32, kv_channels=4)


def test_qwen25_05b_parameter_count_matches_hf():
    hf = json.loads((CONFIGS / "qwen2.5-0.5b-instruct.config.json").read_text())
    shape = ModelShape(**shape_fields_from_hf(hf))
    assert stage_params(shape, Layout(1, 1, 1, 1), 24, True, True) == 494_032_768  # HF's num_parameters()


def test_tiny_params_by_hand():
    # layer: qkv 8*(2+4)*4=192, proj 2*4*8=64, fc1 8*16*2=256, fc2 16*8=128, norms 2*8=16 -> 656
    assert stage_params(TINY, Layout(1, 1, 1, 1), 2, True, True) == 2 * 656 + 32 * 8 + 8
    # tp=2: sharded 640/2=320 + norms 16 = 336 per layer; embedding 256/2
    assert stage_params(TINY, Layout(2, 1, 1, 1), 2, True, True) == 2 * 336 + 128 + 8
    # pp=2: stage 0 = 1 layer + embedding; last stage = 1 layer + final norm + output copy (tied, pp>1)
    assert stage_params(TINY, Layout(1, 2, 1, 1), 1, True, False) == 656 + 256
    assert stage_params(TINY, Layout(1, 2, 1, 1), 1, False, True) == 656 + 8 + 256


def test_weights_grads_optimizer_bytes():
    P = 1576
    batch = Batch(micro_batch_size=1, global_batch_size=4, seq_length=16)
    m = estimate(TINY, Layout(1, 1, 1, 4), batch, Training(use_distributed_optimizer=False))
    assert (m.params, m.weights, m.grads, m.optimizer) == (P, 2 * P, 4 * P, 12 * P)
    m = estimate(TINY, Layout(1, 1, 1, 4), batch, Training(use_distributed_optimizer=True))
    assert m.optimizer == 12 * P // 4
    m = estimate(TINY, Layout(1, 1, 1, 4), batch, Training(dtype_bytes=4, use_distributed_optimizer=False))
    assert (m.weights, m.optimizer) == (4 * P, 8 * P)


def test_activations_by_recompute_mode():
    batch = Batch(micro_batch_size=1, global_batch_size=1, seq_length=16)
    lay = Layout(1, 1, 1, 1)
    # per layer, s=16 b=1: attention 4*16*8 + 2*16*6*4 + 2*16*2*4 + 4*16*2 (lse) = 1664;
    # mlp 4*16*8 + 2*16*32 + 2*16*16 = 2048; logits 6*s*b*V = 3072
    sel = estimate(TINY, lay, batch, Training(recompute_granularity="selective"))
    assert sel.activations == 2 * 3712 + 3072
    none = estimate(TINY, lay, batch, Training(recompute_granularity=None))
    assert none.activations == sel.activations  # flash/flex attention keeps no scores to recompute
    # An unfused attention keeps 5*b*a*s^2 = 2560 per layer unless core_attn is recomputed.
    unfused = estimate(TINY, lay, batch, Training(recompute_granularity=None, unfused_attention=True))
    assert unfused.activations == 2 * (3712 + 2560) + 3072
    assert estimate(TINY, lay, batch, Training(unfused_attention=True)).activations == sel.activations
    # mlp_act drops the fc2 input 2*16*16 = 512 per layer.
    act = estimate(TINY, lay, batch, Training(recompute_mlp_act=True))
    assert act.activations == 2 * (3712 - 512) + 3072
    full = estimate(TINY, lay, batch, Training(recompute_granularity="full", recompute_method="uniform"))
    assert full.activations == 2 * (2 * 16 * 8) + 3712 + 3072
    # The chunked cross entropy: one chunk's budget + the output layer's weight gradient 6*V*h.
    from hpctrain.plan.memory import CHUNKED_CE_GIB
    ce = estimate(TINY, lay, batch, Training(chunked_ce=True))
    assert ce.activations == 2 * 3712 + int(CHUNKED_CE_GIB * GIB) + 6 * 32 * 8


def test_sequence_parallel_and_micro_batches_in_flight():
    lay = Layout(tp=2, pp=2, cp=1, dp=1)
    sp = Batch(micro_batch_size=1, global_batch_size=8, seq_length=16, sequence_parallel=True)
    m = estimate(TINY, lay, sp, Training())
    # stage 0 (1 layer, 2 micro-batches in flight): attn 4*16*8/2 + (2*16*6*4)/2 + (2*16*2*4)/2 + 4*16*2/2
    # = 256+384+128+64; mlp 4*16*8/2 + 2*16*32/2 + 2*16*16/2 = 256+512+256; stage 1 (1 in flight) adds
    # logits 6*16*32/2 = 1536
    per_layer = 832 + 1024
    assert max(2 * per_layer, per_layer + 1536) == m.activations


def test_warning_when_it_does_not_fit():
    from hpctrain.plan.layout import Cluster, make_layout
    from hpctrain.plan.planner import plan_layout

    hf = json.loads((CONFIGS / "qwen2.5-7b-instruct.config.json").read_text())
    shape = ModelShape(**shape_fields_from_hf(hf))
    cluster = Cluster(1, 8)
    plan = plan_layout(shape, cluster, make_layout(cluster, 1, 1, 1), Batch(global_batch_size=8), Training(),
                       40 * GIB)
    assert not plan.memory.fits
    assert any("exceeds the usable 36.0 GiB" in w for w in plan.warnings)


def test_lora_estimate_counts_grads_and_optimizer_of_the_adapters_only():
    # per layer, r=2: B rows of qkv (2+4)*4=24 and fc1 2*16=32, A columns of proj 2*4=8 and fc2 16
    # -> 80 split; A of qkv/fc1 and B of proj/fc2 over h=8 -> 32 whole; 2 * (80 + 32) = 224
    batch = Batch(micro_batch_size=1, global_batch_size=4, seq_length=16)
    full = estimate(TINY, Layout(1, 1, 1, 1), batch, Training(use_distributed_optimizer=False))
    lora = estimate(TINY, Layout(1, 1, 1, 1), batch, Training(use_distributed_optimizer=False, lora_rank=2))
    assert lora.weights == full.weights and lora.activations == full.activations
    assert (lora.grads, lora.optimizer) == (4 * 2 * 224, 12 * 2 * 224)
    tp2 = estimate(TINY, Layout(2, 1, 1, 1), batch, Training(use_distributed_optimizer=False, lora_rank=2))
    assert tp2.grads == 4 * 2 * 2 * (40 + 32)
