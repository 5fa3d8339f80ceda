"""pt mode: documents + EOS concatenated and cut into seq_length+1 windows (native sample index).

The reference stream is built here independently: the tokenizer applied to each text of the file
in file order, EOS appended, concatenated."""
import json

import numpy as np
import pytest
import torch
from datahelp import ASSETS, QWEN_DIR, qwen, write_jsonl

from hpctrain.data import (DataError, DataOptions, MicroBatchLoader, PtWindowDataset, build_train_valid,
                           collate_windows, prepare)

S = 60  # not a multiple of the pad multiple below, so the padded columns are exercised too


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt")
    with open(ASSETS / "alpaca_gpt4_en.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["output"] for _, line in zip(range(40), f)]
    path = write_jsonl(d / "docs.jsonl", [{"text": t} for t in texts])
    tok = qwen()
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    stream = np.array([t for doc in docs for t in doc], dtype=np.int64)
    starts = np.cumsum([0] + [len(doc) for doc in docs])[:-1]
    return d, path, stream, starts, max(len(doc) for doc in docs)


def _opts(path, **kw):
    return DataOptions(dataset=[path], mode="pt", seq_length=S, max_length=S, dataset_shuffle=False, **kw)


@pytest.fixture(scope="module")
def windows(corpus):
    _, path, *_ = corpus
    plain, _ = build_train_valid(_opts(path), qwen())
    reset, _ = build_train_valid(_opts(path, packing=True), qwen())
    return plain, reset


def test_windows_cover_the_concatenated_stream_in_order(corpus, windows):
    _, _, stream, _, longest = corpus
    plain, reset = windows
    assert longest > S  # documents longer than a window are kept whole, not dropped by max_length
    n = (len(stream) - 1) // S
    assert len(plain) == len(reset) == n
    for i in range(n):
        ids, mask, _ = plain[i]
        assert len(ids) == S + 1 and mask.all()
        assert np.array_equal(ids, stream[i * S:i * S + S + 1])
    batch = collate_windows([plain[i] for i in range(n)], plain.pad_id, pad_to_multiple=16)
    assert batch["input_ids"].shape == (n, 64) and "cu_seqlens" not in batch
    inp, lab = batch["input_ids"][:, :S], batch["labels"][:, :S]
    # inputs of consecutive windows tile the stream; labels are the inputs shifted by one token
    assert np.array_equal(inp.reshape(-1).numpy(), stream[:n * S])
    assert np.array_equal(lab.reshape(-1).numpy(), stream[1:n * S + 1])
    assert (batch["labels"][:, S:] == -100).all() and batch["num_loss_tokens"] == n * S
    assert torch.equal(batch["position_ids"][0], torch.arange(64))
    # another document order: the windows follow the stream of the documents in that order
    order = np.random.default_rng(0).permutation(len(plain.base))
    shuffled = PtWindowDataset.build(plain.base, S, doc_order=order)
    ref = np.concatenate([plain.base[int(d)][0] for d in order])
    assert len(shuffled) == (len(ref) - 1) // S
    for i in range(len(shuffled)):
        assert np.array_equal(shuffled[i][0], ref[i * S:i * S + S + 1])


def test_packing_resets_positions_and_cu_seqlens_at_document_starts(corpus, windows):
    _, _, stream, starts, _ = corpus
    plain, reset = windows
    n = len(reset)
    assert reset.reset_at_documents and not plain.reset_at_documents  # data.packing decides
    batch = collate_windows([reset[i] for i in range(n)], reset.pad_id, 16, reset_at_documents=True)
    ref = collate_windows([plain[i] for i in range(n)], plain.pad_id, pad_to_multiple=16)
    assert torch.equal(batch["input_ids"], ref["input_ids"]) and torch.equal(batch["labels"], ref["labels"])
    pos, s = batch["position_ids"], batch["input_ids"].shape[1]
    assert int((pos[:, 1:S] == 0).sum()) >= 20  # documents really start inside windows
    expected_cu = []
    for r in range(n):
        g = r * S + np.arange(S)  # stream offset of every input token of window r
        doc_start = np.maximum(starts[np.searchsorted(starts, g, side="right") - 1], r * S)
        assert np.array_equal(pos[r, :S].numpy(), g - doc_start)
        assert np.array_equal(pos[r, S:].numpy(), np.arange(s - S))  # the padding is its own segment
        expected_cu += [r * s + int(x) for x in np.unique(doc_start - r * S)] + [r * s + S]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == expected_cu + [n * s]


@pytest.mark.parametrize("which", [0, 1])
def test_loader_epochs_seed_and_resume(windows, which):
    ds = windows[which]
    n, mbs, dp = len(ds), 2, 2
    per_epoch = n // (mbs * dp)
    ranks = [MicroBatchLoader(ds, mbs, r, dp, seed=7).index_batches() for r in range(dp)]
    epoch = [[i for _ in range(per_epoch) for i in next(it)] for it in ranks]
    flat = [i for e in epoch for i in e]
    assert len(set(flat)) == len(flat) == per_epoch * mbs * dp  # disjoint ranks, no window twice
    one = MicroBatchLoader(ds, 1, 0, 1, seed=7)
    e0, e1 = [one._sample(k) for k in range(n)], [one._sample(n + k) for k in range(n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1  # every window once per epoch, reshuffled
    assert e0 == [MicroBatchLoader(ds, 1, 0, 1, seed=7)._sample(k) for k in range(n)]
    assert e0 != [MicroBatchLoader(ds, 1, 0, 1, seed=8)._sample(k) for k in range(n)]
    it = iter(MicroBatchLoader(ds, mbs, 1, dp, seed=7))
    batches = [next(it) for _ in range(per_epoch + 3)]  # crosses the epoch boundary
    k = per_epoch + 1
    resumed = next(iter(MicroBatchLoader(ds, mbs, 1, dp, seed=7, consumed_samples=k * mbs * dp)))
    assert resumed.keys() == batches[k].keys() and ("cu_seqlens" in resumed) == bool(which)
    for key, v in resumed.items():
        assert torch.equal(v, batches[k][key]) if torch.is_tensor(v) else v == batches[k][key]


def test_prep_shards_memory_map_the_same_windows_and_refuse_another_seq_length(corpus, windows, tmp_path):
    _, path, stream, _, _ = corpus
    opts = _opts(path, packing=True, split_dataset_ratio=0.1, prep_dir=str(tmp_path / "p"))
    man = prepare(opts, qwen(), opts.prep_dir, str(QWEN_DIR))
    info = man["splits"]["train"]["pt"]
    assert info["seq_length"] == S and man["splits"]["train"]["dropped_too_long"] == 0
    assert info["windows"] == (info["stream_tokens"] - 1) // S
    train, valid = build_train_valid(opts, qwen(), tokenizer_source=str(QWEN_DIR))
    assert isinstance(train, PtWindowDataset) and train.reset_at_documents and len(valid) >= 1
    assert isinstance(train.sample_idx, np.memmap) and isinstance(train.base.tokens, np.memmap)
    tokens = np.asarray(train.base.tokens)
    for i in range(len(train)):  # windows are contiguous slices of the split's own stream
        assert np.array_equal(train[i][0], tokens[i * S:i * S + S + 1])
    with pytest.raises(DataError, match=r"pt_seq_length: 60 -> 30"):
        prepare(DataOptions(**{**opts.__dict__, "seq_length": 30}), qwen(), opts.prep_dir, str(QWEN_DIR))


def test_pt_errors(tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "Hi."}])
    with pytest.raises(DataError, match=r"fewer than one window of seq_length \+ 1 = 61"):
        build_train_valid(_opts(short), qwen())
    with pytest.raises(ValueError, match="lazy_tokenize = false"):
        _opts(short, lazy_tokenize=True)


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.int64])
def test_collate_windows_labels_for_any_stored_token_dtype(dtype):
    # Shards store ids unsigned when the vocabulary allows; -100 must still come out (numpy 2
    # refuses to put -100 into a uint32 array: this failed on the GPU machine).
    from hpctrain.data import collate_windows
    ids, mask = np.arange(10, 19, dtype=dtype), np.ones(9, dtype=np.uint8)
    mask[3] = 0
    out = collate_windows([(ids, mask, [0])], pad_id=0)
    assert out["labels"].tolist() == [[11, 12, -100, 14, 15, 16, 17, 18]]
    assert out["input_ids"].tolist() == [list(range(10, 18))]
