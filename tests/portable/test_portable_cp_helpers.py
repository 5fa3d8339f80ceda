"""Batch helpers for context parallel and packed (thd) micro-batches."""
import pytest
import torch

from hpctrain.model.portable.context_parallel import (
    cp_chunk_index, cp_gather_order, cp_token_index, pad_segments_for_cp, split_batch_for_cp)
from hpctrain.model.portable.packing import packed_seq_params, to_thd


def test_chunks_are_load_balanced_and_cover_the_sequence():
    # 16 tokens, CP=2 -> chunks of 4: rank 0 keeps chunks 0 and 3, rank 1 keeps 1 and 2.
    assert cp_chunk_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_chunk_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    cu = [0, 8, 24, 32]
    held = torch.cat([cp_token_index(cu, 32, 4, r) for r in range(4)])
    assert sorted(held.tolist()) == list(range(32))
    assert torch.equal(held[cp_gather_order(cu, 32, 4)], torch.arange(32))
    # Each segment is split on its own: rank 0 of CP=2 holds the 1st and 4th quarter of each.
    assert cp_token_index(cu, 32, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23,
                                                     24, 25, 30, 31]


def test_bad_lengths_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 2\\*context_parallel_size"):
        cp_chunk_index(10, 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        cp_token_index([0, 8], 16, 2, 0)


def test_split_unpacked_batch_and_loss_token_count():
    ids = torch.arange(32).view(2, 16)
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).repeat(2, 1),
             "num_loss_tokens": 28}
    parts = [split_batch_for_cp(batch, 2, r) for r in range(2)]
    assert parts[0]["input_ids"][1].tolist() == [16, 17, 18, 19, 28, 29, 30, 31]
    assert sum(p["num_loss_tokens"] for p in parts) == 28
    assert split_batch_for_cp(batch, 1, 0) is batch


def test_pad_segments_then_thd_stream():
    rows = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]),
            "labels": torch.tensor([[6, 7, 8, -100], [10, 11, 12, -100]]),
            "position_ids": torch.tensor([[0, 1, 2, 0], [0, 1, 2, 3]]),
            "cu_seqlens": torch.tensor([0, 3, 4, 8], dtype=torch.int32)}
    thd = to_thd(rows)
    assert thd["input_ids"].shape == (1, 8)
    padded = pad_segments_for_cp(thd, 2, pad_token_id=0)
    assert padded["cu_seqlens"].tolist() == [0, 4, 8, 12]
    assert padded["input_ids"][0].tolist() == [5, 6, 7, 0, 8, 0, 0, 0, 9, 10, 11, 12]
    assert padded["labels"][0].tolist() == [6, 7, 8, -100, -100, -100, -100, -100, 10, 11, 12, -100]
    assert padded["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    psp = packed_seq_params(padded["cu_seqlens"])
    assert psp.qkv_format == "thd" and psp.max_seqlen_q == 4
    with pytest.raises(ValueError, match="thd"):
        split_batch_for_cp(rows, 2, 0)
