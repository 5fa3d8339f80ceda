"""Dataset layouts on disk (hpctrain/data/layouts.py), each with real files written by pyarrow,
datasets or gzip: .arrow (datasets' stream files and Arrow IPC files), .jsonl.gz, globs, hub
snapshot folders (data/<split>-XXXXX-of-YYYYY.parquet and <split>/XXXX.parquet), and parquet read
one row group at a time. Every layout must give back exactly the rows that were written."""
from __future__ import annotations

import gzip
import json

import pytest

from hpctrain.data import DataError, DataOptions
from hpctrain.data.mixing import build_row_plans
from hpctrain.data.sources import open_source, parse_spec

ROWS = [{"query": f"question {i}", "response": f"answer {i}", "n": i} for i in range(60)]


def _open(spec: str):
    return open_source(parse_spec(spec))


def _all(src) -> list[dict]:
    return [src.get(i) for i in range(len(src))]


def test_arrow_files_from_datasets_and_pyarrow(tmp_path):
    import datasets
    import pyarrow as pa

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    stream_file = next((tmp_path / "saved").glob("*.arrow"))  # the IPC stream format datasets writes
    assert _all(_open(str(stream_file))) == ROWS
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=7)
    src = _open(str(tmp_path / "f.arrow"))
    assert _all(src) == ROWS and src.where(4) == f"{tmp_path / 'f.arrow'} row 5"
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="cannot read Arrow file"):
        _open(str(tmp_path / "bad.arrow"))


def test_jsonl_gz_reads_rows_and_names_the_gz_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    lines = [json.dumps(r) for r in ROWS[:3]] + ["", '{"query": "broken']
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    src = _open(str(path))
    assert len(src) == 4 and [src.get(i) for i in range(3)] == ROWS[:3]
    with pytest.raises(DataError, match=rf"{path}:5: malformed JSON"):
        src.get(3)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match="cannot read gzip file"):
        _open(str(tmp_path / "bad.jsonl.gz"))


def test_glob_is_every_matching_file_in_sorted_order(tmp_path):
    for k in range(3):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"part-{k}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in ROWS[20 * k:20 * (k + 1)]))
    src = _open(str(tmp_path / "shards" / "part-*.jsonl"))
    assert _all(src) == ROWS
    assert src.where(25) == f"{tmp_path / 'shards' / 'part-1.jsonl'}:6"
    spec = parse_spec(f"{tmp_path}/shards/*.jsonl#10")
    assert spec.count == 10 and len(open_source(spec)) == 60
    with pytest.raises(DataError, match="matches no file"):
        _open(str(tmp_path / "nothing-*.jsonl"))


def _parquet(path, rows, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)


def test_hub_snapshot_folders_by_split(tmp_path):
    snap = tmp_path / "snapshot"  # as snapshot_download leaves a parquet dataset repo
    _parquet(snap / "data" / "train-00000-of-00002.parquet", ROWS[:30])
    _parquet(snap / "data" / "train-00001-of-00002.parquet", ROWS[30:50])
    _parquet(snap / "data" / "test-00000-of-00001.parquet", ROWS[50:])
    (snap / "README.md").write_text("---\nconfigs: ...\n---\n")
    (snap / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (snap / ".cache").mkdir()
    _parquet(snap / ".cache" / "train-stale.parquet", ROWS[:1])
    assert _all(_open(str(snap))) == ROWS[:50]          # train by default
    assert _all(_open(f"{snap}:test")) == ROWS[50:]
    with pytest.raises(DataError, match=r"split 'validation' not found; its data files give \['test', 'train'\]"):
        _open(f"{snap}:validation")
    other = tmp_path / "by-folder"                      # <split>/<n>.parquet
    _parquet(other / "train" / "0000.parquet", ROWS[:10])
    _parquet(other / "validation" / "0000.parquet", ROWS[10:12])
    assert _all(_open(str(other))) == ROWS[:10] and _all(_open(f"{other}:validation")) == ROWS[10:12]
    only = tmp_path / "one-split"
    _parquet(only / "data" / "rows.parquet", ROWS[:5])
    assert _all(_open(str(only))) == ROWS[:5]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = [{"query": "q" * 2000 + str(i), "response": "r" * 2000, "n": i} for i in range(2000)]
    path = tmp_path / "big.parquet"
    _parquet(path, big, row_group_size=100)
    whole = pa.Table.from_pylist(big).nbytes
    seen, original = [], pq.ParquetFile.read_row_group

    def read_row_group(self, i, *a, **k):
        table = original(self, i, *a, **k)
        seen.append(pa.total_allocated_bytes())
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("parquet read whole"))
    before = pa.total_allocated_bytes()
    src = _open(str(path))
    assert len(seen) == 20  # every row group once
    assert max(seen) - before < whole / 5, (max(seen) - before, whole)
    assert len(src) == 2000 and src.get(1234) == big[1234] and src.where(0) == f"{path} row 1"


def test_layouts_mix_into_one_training_plan(tmp_path):
    _parquet(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet", ROWS[:20])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[20:30]))
    opts = DataOptions(dataset=[f"{tmp_path}/snap#5", f"{tmp_path}/*.jsonl.gz"], dataset_shuffle=False)
    train, _ = build_row_plans(opts)
    rows = [train.get(k)[0] for k in range(len(train))]
    assert len(rows) == 15 and rows[5:] == ROWS[20:30] and all(r in ROWS[:20] for r in rows[:5])
