"""Dataset specs, '#N' sampling, mixing, shuffling and the validation split (no tokenizer needed)."""
import numpy as np
import pytest
from datahelp import ASSETS

from hpctrain.data import DataError, DataOptions
from hpctrain.data.mixing import build_row_plans
from hpctrain.data.sources import parse_spec, sample_rows

EN = str(ASSETS / "alpaca_gpt4_en.jsonl")  # 999 rows
SC = str(ASSETS / "self_cognition.jsonl")  # 134 rows


def test_parse_spec():
    s = parse_spec("AI-ModelScope/alpaca-gpt4-data-zh#500")
    assert (s.path, s.subset, s.count) == ("AI-ModelScope/alpaca-gpt4-data-zh", None, 500)
    s = parse_spec("org/data:default#7")
    assert (s.path, s.subset, s.count) == ("org/data", "default", 7)
    assert parse_spec(EN).path == EN and parse_spec(EN).count is None
    with pytest.raises(DataError, match="'#abc' is not a positive row count"):
        parse_spec("x.jsonl#abc")


def test_sample_rows_counts_and_determinism():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    few = sample_rows(100, 30, rng())
    assert len(few) == 30 and len(set(few.tolist())) == 30 and few.max() < 100
    assert np.array_equal(few, sample_rows(100, 30, rng()))
    assert not np.array_equal(few, sample_rows(100, 30, np.random.default_rng(4)))
    many = sample_rows(100, 250, rng())
    counts = np.bincount(many, minlength=100)
    assert len(many) == 250 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 50
    assert np.array_equal(sample_rows(5, None, rng()), np.arange(5))


def test_mix_aliases_split_and_determinism():
    opts = DataOptions(dataset=[f"{EN}#500", "swift/self-cognition#300"], split_dataset_ratio=0.1, seed=7)
    train, valid = build_row_plans(opts)
    assert len(train) + len(valid) == 800 and len(valid) == 80
    assert np.bincount(np.concatenate([train.src, valid.src])).tolist() == [500, 300]
    keys = set(zip(train.src.tolist(), train.row.tolist(), range(len(train))))
    assert len(keys) == len(train)
    again_t, again_v = build_row_plans(opts)
    assert np.array_equal(train.row, again_t.row) and np.array_equal(valid.row, again_v.row)
    other, _ = build_row_plans(DataOptions(dataset=opts.dataset, split_dataset_ratio=0.1, seed=8))
    assert not np.array_equal(train.row, other.row)
    raw, where = train.get(0)
    assert isinstance(raw, dict) and (":" in where)


def test_no_shuffle_keeps_file_order_and_val_dataset_wins():
    opts = DataOptions(dataset=[SC], dataset_shuffle=False, val_dataset=[f"{EN}#10"], split_dataset_ratio=0.5)
    train, valid = build_row_plans(opts)
    assert np.array_equal(train.row, np.arange(134)) and len(valid) == 10


def test_empty_dataset_list_is_an_error():
    with pytest.raises(ValueError, match="data.dataset is empty"):
        build_row_plans(DataOptions(dataset=[]))
