"""`hpctrain prep`: shards written once, reused with the same config, refused with another."""
import json
import os

import numpy as np
import pytest
from datahelp import ASSETS, QWEN_DIR, qwen, write_jsonl

from hpctrain.data import DataError, DataOptions, build_train_valid, prepare
from hpctrain.data import pipeline
from hpctrain.data.prep import run


def _opts(tmp_path, data, **kw):
    return DataOptions(dataset=[data], max_length=256, packing=True, split_dataset_ratio=0.2,
                       prep_dir=str(tmp_path / "shards"), **kw)


def test_prep_reuse_refusal_and_memory_mapped_training_read(tmp_path, monkeypatch):
    rows = [{"query": f"question {i}?", "response": f"answer number {i}."} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    opts = _opts(tmp_path, data)
    m1 = prepare(opts, qwen(), opts.prep_dir, str(QWEN_DIR))
    out = tmp_path / "shards"
    assert sorted(os.listdir(out)) == ["manifest.json", "train", "valid"]
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "shards"]  # no temporary directory left behind
    assert m1["splits"]["train"]["samples"] == 32 and m1["splits"]["valid"]["samples"] == 8
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(opts, qwen(), opts.prep_dir, str(QWEN_DIR)) == m1
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    train, valid = build_train_valid(opts, qwen(), tokenizer_source=str(QWEN_DIR))
    assert train.packed and isinstance(train.base.tokens, np.memmap) and len(valid.base) == 8
    monkeypatch.setattr(pipeline, "CHUNK", 8)  # several chunks, so the worker pool really runs
    # tokenizing in 2 worker processes gives the same shards as the prep (1 process)
    fresh, _ = build_train_valid(DataOptions(**{**opts.__dict__, "prep_dir": None, "dataset_num_proc": 2}),
                                 qwen(), tokenizer_source=str(QWEN_DIR))
    assert np.array_equal(np.asarray(train.base.tokens), np.asarray(fresh.base.tokens))
    assert np.array_equal(train.base.index, fresh.base.index) and np.array_equal(train.order, fresh.order)

    with pytest.raises(DataError, match=r"changed: max_length: 256 -> 200"):
        prepare(DataOptions(**{**opts.__dict__, "max_length": 200}), qwen(), opts.prep_dir, str(QWEN_DIR))
    write_jsonl(tmp_path / "d.jsonl", rows + [{"query": "q", "response": "r"}])  # the data file changed
    with pytest.raises(DataError, match=r"changed: dataset: "):
        build_train_valid(opts, qwen(), tokenizer_source=str(QWEN_DIR))


def test_missing_prep_dir_tells_to_run_prep(tmp_path):
    opts = _opts(tmp_path, str(ASSETS / "self_cognition.jsonl"))
    with pytest.raises(DataError, match="run `hpctrain prep CONFIG` once"):
        build_train_valid(opts, qwen(), tokenizer_source=str(QWEN_DIR))


def test_prep_command_from_toml(tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text(f"""
[model]
model = "{QWEN_DIR}"
[data]
dataset = ["swift/self-cognition#30"]
model_name = ["小黄", "Robo"]
model_author = ["魔搭", "Acme"]
max_length = 128
packing = true
prep_dir = "{tmp_path / 'p'}"
""")
    assert run([str(cfg)]) == 0
    man = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert man["splits"]["train"]["rows"] == 30 and man["splits"]["train"]["packing"]["bins"] >= 1
    assert run([str(cfg), "--max_length", "64"]) == 2
    assert "changed: max_length: 128 -> 64" in capsys.readouterr().out
