"""Data settings that change the rows: val_dataset_shuffle (validation order) and columns (row keys)."""
import json

import pytest
from datahelp import qwen

from hpctrain.config import load_config
from hpctrain.data import DataError, DataOptions
from hpctrain.data.mixing import build_row_plans
from hpctrain.data.prep import _encoder


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(12)))
    return str(path)


def data_options(*flags):
    return DataOptions.from_config(load_config(None, list(flags), environ={}))


def test_val_dataset_shuffle_reorders_the_validation_rows(rows):
    def valid_rows(*flags):
        _, valid = build_row_plans(data_options("--dataset", rows, "--val_dataset", rows, *flags))
        return valid.row.tolist()

    assert valid_rows() == list(range(12))
    shuffled = valid_rows("--val_dataset_shuffle", "true")
    assert sorted(shuffled) == list(range(12)) and shuffled != list(range(12))
    assert shuffled == valid_rows("--val_dataset_shuffle", "true")  # seeded
    _, split = build_row_plans(data_options("--dataset", rows, "--split_dataset_ratio", "0.5",
                                            "--val_dataset_shuffle", "true"))
    assert split.row.tolist() != sorted(split.row.tolist())


def test_columns_renames_row_keys_before_the_format_is_read(rows):
    opts = data_options("--dataset", rows, "--columns", '{"q": "query", "a": "response"}')
    conv = _encoder(opts, qwen()).conversation({"q": "hi", "a": "hello"}, "qa.jsonl:1")
    assert conv.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="qa.jsonl:1"):  # without the mapping the row fits no format
        _encoder(data_options("--dataset", rows), qwen()).conversation({"q": "hi", "a": "hello"}, "qa.jsonl:1")
