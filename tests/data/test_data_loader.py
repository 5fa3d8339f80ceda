"""Packing, collation, the DP-sharded resumable loader and lazy tokenization, on real data."""
import numpy as np
import pytest
import torch
from datahelp import ASSETS, qwen

from hpctrain.data import (DataOptions, MicroBatchLoader, SkipTally, build_train_valid, collate_packed,
                           collate_padded)
from hpctrain.data.template import EncodeStats

EN = str(ASSETS / "alpaca_gpt4_en.jsonl")


@pytest.fixture(scope="module")
def packed_and_plain():
    base = dict(dataset=[f"{EN}#120", "swift/self-cognition#40"], max_length=384, seed=5,
                model_name=["小黄", "Robo"], model_author=["魔搭", "Acme"])
    packed, _ = build_train_valid(DataOptions(**base, packing=True), qwen())
    plain, _ = build_train_valid(DataOptions(**base), qwen())
    return packed, plain


def _labels_ref(ids, mask):
    return [int(ids[t + 1]) if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def test_packing_keeps_every_token_once_with_positions_and_cu_seqlens(packed_and_plain):
    packed, plain = packed_and_plain
    assert packed.packed and len(packed) < len(plain)
    assert sorted(packed.order.tolist()) == list(range(len(plain)))  # every sample in exactly one bin
    for start in range(0, len(packed), 4):
        bins = [packed[i] for i in range(start, min(start + 4, len(packed)))]
        batch = collate_packed(bins, packed.pad_id, pad_to_multiple=8)
        b, s = batch["input_ids"].shape
        assert s % 8 == 0 and s <= 384 + 7
        cu = batch["cu_seqlens"].tolist()
        assert batch["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
        flat_ids, flat_lab, flat_pos = (batch[k].reshape(-1).tolist() for k in ("input_ids", "labels",
                                                                                   "position_ids"))
        seg = 0
        for r, row in enumerate(bins):
            off = r * s
            for ids, mask in row:
                assert cu[seg] == off
                assert flat_ids[off:off + len(ids)] == ids.tolist()
                assert flat_pos[off:off + len(ids)] == list(range(len(ids)))
                assert flat_lab[off:off + len(ids)] == _labels_ref(ids, mask)
                off += len(ids)
                seg += 1
            if off < (r + 1) * s:  # the row's padding is one more segment, no loss, positions restart
                assert cu[seg] == off and flat_pos[off] == 0
                assert set(flat_lab[off:(r + 1) * s]) == {-100}
                seg += 1
        assert seg == len(cu) - 1
        assert batch["num_loss_tokens"] == int((batch["labels"] != -100).sum())


def test_padded_collate_shifts_labels_and_masks_padding(packed_and_plain):
    _, plain = packed_and_plain
    samples = [plain[i] for i in range(3)]
    batch = collate_padded(samples, plain.pad_id, pad_to_multiple=16)
    assert batch["input_ids"].shape[1] % 16 == 0 and "cu_seqlens" not in batch
    for r, (ids, mask) in enumerate(samples):
        assert batch["labels"][r, :len(ids)].tolist() == _labels_ref(ids, mask)
        assert (batch["labels"][r, len(ids):] == -100).all()
        assert (batch["input_ids"][r, len(ids):] == plain.pad_id).all()
    # only assistant tokens are targets: the decoded targets of sample 0 are its answer + <|im_end|>
    lab = batch["labels"][0]
    assert qwen().decode(lab[lab != -100]).endswith("<|im_end|>")


@pytest.mark.parametrize("which", ["plain", "packed"])
def test_resume_continues_with_the_same_next_batch(packed_and_plain, which):
    ds = packed_and_plain[1] if which == "plain" else packed_and_plain[0]
    full = MicroBatchLoader(ds, 2, dp_rank=1, dp_size=2, seed=11)
    it = iter(full)
    batches = [next(it) for _ in range(30)]  # crosses an epoch boundary for the packed set
    consumed = 17 * 2 * 2  # 17 global batches of mbs 2 x dp 2
    resumed = next(iter(MicroBatchLoader(ds, 2, dp_rank=1, dp_size=2, seed=11, consumed_samples=consumed)))
    for k in resumed:
        a, b = batches[17][k], resumed[k]
        assert (a == b).all() if torch.is_tensor(a) else a == b


def test_dp_shards_are_disjoint_and_complete_and_epochs_reshuffle(packed_and_plain):
    _, ds = packed_and_plain
    n, mbs, dp = len(ds), 3, 4
    steps = n // (mbs * dp)
    seen = []
    for r in range(dp):
        it = MicroBatchLoader(ds, mbs, r, dp, seed=2).index_batches()
        seen.append([i for _ in range(steps) for i in next(it)])
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) == steps * mbs * dp
    one = MicroBatchLoader(ds, mbs * dp, 0, 1, seed=2).index_batches()
    epoch = [i for _ in range(-(-n // (mbs * dp))) for i in next(one)][:n]
    assert sorted(epoch) == list(range(n))
    second = [MicroBatchLoader(ds, 1, 0, 1, seed=2)._sample(n + k) for k in range(n)]
    assert sorted(second) == list(range(n)) and second != epoch


def test_lazy_tokenize_matches_eager_and_worker_loader_matches_in_process(packed_and_plain):
    _, eager = packed_and_plain
    opts = DataOptions(dataset=[f"{EN}#120", "swift/self-cognition#40"], max_length=384, seed=5,
                       model_name=["小黄", "Robo"], model_author=["魔搭", "Acme"], lazy_tokenize=True)
    lazy, _ = build_train_valid(opts, qwen())
    # eager drops over-long rows; the lazy set replaces each by the next usable row instead
    plan = lazy.plan
    res = lazy.encoder.encode_batch([plan.get(k) for k in range(len(plan))], SkipTally(), EncodeStats())
    usable = [r is not None for r in res]
    assert len(eager) == sum(usable) < len(plan)  # some rows really are too long
    eager_of = np.cumsum(usable) - 1
    for i in range(len(plan)):
        j = next((k for k in range(i, len(plan)) if usable[k]), None)
        if j is None:
            break
        ids, mask = lazy[i]
        assert np.array_equal(ids, eager[int(eager_of[j])][0]) and np.array_equal(mask, eager[int(eager_of[j])][1])
    a = list(zip(range(3), MicroBatchLoader(lazy, 2, 0, 1, seed=1, num_workers=0)))
    b = list(zip(range(3), MicroBatchLoader(lazy, 2, 0, 1, seed=1, num_workers=1)))
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
