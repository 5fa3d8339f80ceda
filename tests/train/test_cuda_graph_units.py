"""What the CUDA-graph step (train/cuda_graph.py) feeds the model equals what the eager step feeds
it; the settings a replay cannot honour are refused at config time. (The replay itself needs a GPU:
tests/train/test_trainer_gpu.py.)"""
import pytest
import torch

from hpctrain.config import ConfigError, load_config
from hpctrain.model.portable.attention import StaticPlan, _get_plan
from hpctrain.train.cuda_graph import _in_sample_positions, _Slot
from hpctrain.train.step import segment_cu_seqlens


def _packed(seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):  # two rows of 12 tokens, random sample lengths; a row may start mid-sample
        pos, left = [], 12
        first = int(torch.randint(0, 4, (1,), generator=g))
        while left:
            n = min(left, int(torch.randint(1, 6, (1,), generator=g)))
            pos += list(range(first, first + n))
            first, left = 0, left - n
        rows.append(pos)
    pos = torch.tensor(rows)
    ids = torch.randint(0, 50, pos.shape, generator=g)
    return dict(input_ids=ids, labels=ids.clone(), position_ids=pos, packed=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slot_plan_equals_the_eager_plan(seed):
    """Sample ids, in-sample positions and the document-causal mask of a refilled slot are those
    the eager path derives from cu_seqlens (train/step.py + attention._Plan)."""
    slot = _Slot(_packed(0), torch.device("cpu"))
    key_ptr = slot.plan.key.data_ptr()
    mb = _packed(seed)
    slot.fill(mb)
    cu = segment_cu_seqlens(mb["position_ids"].clone())
    eager = _get_plan(cu, 24, 24, 1, 0, "cpu", host_cu_seqlens=cu.tolist())
    assert torch.equal(slot.plan.doc, eager.doc)
    assert torch.equal(slot.plan.positions(), eager.positions())
    assert torch.equal(slot.plan.dense_mask(), eager.dense_mask())
    # The model finds the slot's plan through the offsets tensor its PackedSeqParams carries.
    assert slot.psp.cu_seqlens_q.data_ptr() == key_ptr
    assert _get_plan(slot.psp.cu_seqlens_q, 24, 24, 1, 0, "cpu") is slot.plan
    assert torch.equal(slot.tensors["input_ids"][0], mb["input_ids"].reshape(-1))


def test_static_plan_refill_keeps_addresses_and_updates_the_block_mask():
    plan = StaticPlan(256, "cpu")
    starts = torch.zeros(256, dtype=torch.bool)
    starts[[0, 100]] = True
    plan.update(torch.cumsum(starts.long(), 0) - 1, _in_sample_positions(starts))
    bm = plan.block_mask(torch.device("cpu"))
    ptrs = (plan.doc.data_ptr(), bm.kv_num_blocks.data_ptr(), bm.kv_indices.data_ptr())
    before = bm.kv_num_blocks.clone()
    starts[:] = False
    starts[0] = True  # one long sample: more blocks to visit
    plan.update(torch.cumsum(starts.long(), 0) - 1, _in_sample_positions(starts))
    assert plan.block_mask(torch.device("cpu")) is bm
    assert (plan.doc.data_ptr(), bm.kv_num_blocks.data_ptr(), bm.kv_indices.data_ptr()) == ptrs
    assert not torch.equal(bm.kv_num_blocks, before) and int(plan.doc.max()) == 0
    assert torch.equal(plan.positions(), torch.arange(256))


@pytest.mark.parametrize("flags,word", [
    (["--tensor_model_parallel_size", "2"], "model parallelism"),
    (["--hidden_dropout", "0.1"], "dropout"),
    (["--fp16", "true", "--bf16", "false"], "fp16"),
    (["--recompute_modules", "core_attn", "mlp_act"], "recompute"),
    (["--recompute_granularity", "full", "--recompute_method", "uniform", "--recompute_num_layers", "1"],
     "recompute"),
])
def test_settings_a_replay_cannot_honour_are_refused(flags, word):
    with pytest.raises(ConfigError, match="cuda_graph_impl") as e:
        load_config(None, ["--cuda_graph_impl", "local", *flags], mode="sft")
    assert word in str(e.value)
    load_config(None, ["--cuda_graph_impl", "local"], mode="sft")  # the plain single-GPU job passes
