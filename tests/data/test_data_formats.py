"""Row formats, self-cognition and the bad-input errors (strict) / skip summary (non-strict)."""
import json

import pytest
from datahelp import ASSETS, qwen, write_jsonl

from hpctrain.data import DataError, DataOptions, Encoder
from hpctrain.data.formats import normalize
from hpctrain.data.mixing import build_row_plans
from hpctrain.data.pipeline import tokenize_to_shards
from hpctrain.data.self_cognition import fill
from hpctrain.data.sources import JsonlSource, open_source, parse_spec

EXPECTED = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "r0"},
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}]
ROWS = {
    "messages": {"messages": [{"role": "system", "content": "S"}] + EXPECTED},
    "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q0"},
                                   {"from": "gpt", "value": "r0"}, {"from": "human", "value": "q1"},
                                   {"from": "gpt", "value": "r1"}]},
    "alpaca": {"system": "S", "instruction": "q1", "input": "", "output": "r1", "history": [["q0", "r0"]]},
    "query_response": {"system": "S", "query": "q1", "response": "r1", "history": [["q0", "r0"]]},
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_format_normalizes_to_the_same_conversation(fmt):
    conv = normalize(ROWS[fmt], "f:1")
    assert conv.system == "S" and conv.messages == EXPECTED


def test_alpaca_input_joins_instruction():
    conv = normalize({"instruction": "Translate", "input": "hola", "output": "hello"}, "f:1")
    assert conv.messages[0]["content"] == "Translate\nhola" and conv.system is None


@pytest.mark.parametrize("row,reason,pattern", [
    ({"instruction": "q", "input": "", "output": ""}, "empty assistant turn", r"f\.jsonl:7: assistant turn 1 is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     "non-string content", r"f\.jsonl:7: messages\[1\]\.content is int, expected a string"),
    ({"prompt": "q", "completion": "r"}, "unknown format", r"f\.jsonl:7: unknown row format; found keys \['completion', 'prompt'\]"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "bad role", r"conversations\[0\]\.from='bot'"),
])
def test_bad_rows_are_clear_errors(row, reason, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        normalize(row, "f.jsonl:7")
    assert e.value.reason == reason


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "a", "response": "b"}, "", '{"query": "a", "resp'])
    src = JsonlSource(path)
    assert len(src) == 2 and src.get(0)["query"] == "a"
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        src.get(1)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(parse_spec(str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot parse parquet file"):
        open_source(parse_spec(str(bad)))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="not a directory saved by datasets"):
        open_source(parse_spec(str(tmp_path / "dir.jsonl")))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot reach the hub for 'someone/some-data'; download it"):
        open_source(parse_spec("someone/some-data#10"))


def _bad_file(tmp_path):
    good = {"query": "q", "response": "r"}
    rows = [good, "{broken", {"instruction": "i", "output": ""}, {"query": "q", "response": ["x"]},
            {"foo": 1}, good]
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_strict_false_skips_and_counts_every_bad_row(tmp_path):
    opts = DataOptions(dataset=[_bad_file(tmp_path)], dataset_shuffle=False, strict=False)
    plan, _ = build_row_plans(opts)
    index, tally, stats = tokenize_to_shards(plan, Encoder(qwen()), tmp_path / "out")
    assert len(index) - 1 == 2 and stats.rows == 6
    assert dict(tally.counts) == {"malformed JSON": 1, "empty assistant turn": 1, "non-string content": 1,
                                  "unknown format": 1}
    line = tally.summary(6)
    assert line.startswith("4 of 6 rows skipped (empty assistant turn: 1, malformed JSON: 1,")
    assert "mixed.jsonl:2: malformed JSON" in line


def test_strict_true_stops_at_first_bad_row(tmp_path):
    opts = DataOptions(dataset=[_bad_file(tmp_path)], dataset_shuffle=False, strict=True)
    plan, _ = build_row_plans(opts)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: malformed JSON"):
        tokenize_to_shards(plan, Encoder(qwen(), strict=True), tmp_path / "out")


def test_self_cognition_fills_names_by_tag():
    src = JsonlSource(str(ASSETS / "self_cognition.jsonl"))
    zh = en = expected_zh = expected_en = 0
    for i in range(len(src)):
        row = src.get(i)
        has = "{{" in row["response"]
        expected_zh += has and row["tag"] == "zh"
        expected_en += has and row["tag"] != "zh"
        conv = fill(normalize(row, src.where(i)), src.where(i), ["小黄", "swift-robot"], ["魔搭", "swift"])
        text = conv.messages[-1]["content"]
        assert "{{" not in text
        if row["tag"] == "zh":
            zh += ("小黄" in text or "魔搭" in text)
            assert "swift-robot" not in text
        else:
            en += ("swift-robot" in text or "swift" in text)
            assert "小黄" not in text
    assert zh == expected_zh > 30 and en == expected_en > 30
    row = src.get(0)
    with pytest.raises(DataError, match="pass --model_name"):
        fill(normalize(row, "sc:1"), "sc:1", [], ["a"])
    one = fill(normalize(row, "sc:1"), "sc:1", ["Bob"], ["Ann"])
    assert "Bob" in one.messages[-1]["content"]


def test_json_parquet_csv_and_saved_dir_sources(tmp_path):
    import datasets
    rows = [{"query": f"q{i}", "response": f"r{i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "a.parquet", "a.csv", "saved"):
        src = open_source(parse_spec(str(tmp_path / name)))
        assert len(src) == 5 and src.get(3) == rows[3], name
    bad = tmp_path / "b.json"
    bad.write_text('[{"query": "a",\n "response": }]')
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        open_source(parse_spec(str(bad)))


def test_self_cognition_placeholders_in_any_case():
    """LLaMA-Factory's identity.json writes {{name}} / {{author}}: filled like {{NAME}} / {{AUTHOR}}."""
    row = {"query": "who are you?", "response": "I am {{name}} by {{Author}}; {{NAME}} from {{AUTHOR}}. $1 \\1"}
    conv = fill(normalize(row, "id.json:1"), "id.json:1", ["Bot\\1 $0"], ["Ann"])
    assert conv.messages[-1]["content"] == "I am Bot\\1 $0 by Ann; Bot\\1 $0 from Ann. $1 \\1"
    with pytest.raises(DataError, match=r"id.json:1: self-cognition row holds \{\{AUTHOR\}\} but model_author is unset"):
        fill(normalize(row, "id.json:1"), "id.json:1", ["Bot"], [])


def test_rows_left_with_placeholders_are_counted_and_named(tmp_path, caplog):
    import logging

    from hpctrain.data.prep import prepare

    caplog.set_level(logging.WARNING)
    rows = [{"query": "who?", "response": "I am {{name}}."}, {"query": "what?", "response": "Ask {{MODEL}}."},
            {"query": "which?", "response": "{{version}} of {{name}}, {{Model}}."}, {"query": "q", "response": "r"}]
    data = write_jsonl(tmp_path / "sc.jsonl", rows)
    opts = DataOptions(dataset=[data], dataset_shuffle=False, model_name=["Bot"], model_author=["Ann"])
    info = prepare(opts, qwen(), tmp_path / "out")["splits"]["train"]
    assert info["placeholder_rows"] == 2 and info["samples"] == 4
    assert f"{data}:2: {{{{MODEL}}}}" in info["placeholder_examples"][0]
    assert f"{data}:3: {{{{version}}}} {{{{Model}}}}" in info["placeholder_examples"][1]
    assert "train: 2 rows still hold a {{...}} placeholder after filling" in caplog.text
