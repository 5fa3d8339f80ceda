"""`hpctrain infer`: batch inference over dataset files into JSONL, the `swift infer` sampling
flags, and the refusal of an mcore folder with the export command. The reference for every answer
is transformers' own ``generate`` on the same prompt (the model is a tiny random Llama with the
real Qwen2.5 tokenizer and chat template, so the texts are gibberish but exactly comparable)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain.infer import run

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):  # tests/conftest.py
    return tiny_llama


@functools.lru_cache(maxsize=1)
def _hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()


def hf_answer(model_dir: Path, conversation: list[dict], **gen) -> str:
    """transformers' generate on one prompt: the ground truth."""
    import torch

    tok, model = _hf(model_dir)
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, pad_token_id=tok.pad_token_id, **gen)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _dataset(tmp_path: Path) -> Path:
    rows = [{"instruction": "Name a colour.", "output": "Blue."},
            {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]},
            {"query": "What is 2+2?"},
            {"conversations": [{"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "No."}]},
            {"query": "Count to three, please", "response": "1 2 3"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_batch_inference_writes_one_answer_per_row_equal_to_hf_generate(tiny, tmp_path, capsys):
    data = _dataset(tmp_path)
    out1, out3 = tmp_path / "b1.jsonl", tmp_path / "b3.jsonl"
    assert run(["--model", str(tiny), *GEN, "--val_dataset", str(data), "--result_path", str(out1),
                "--max_batch_size", "1"]) == 0
    assert run(["--model", str(tiny), *GEN, "--val-dataset", str(data), "--result-path", str(out3),
                "--max_batch_size", "3", "--system", "You are a test."]) == 0
    assert "wrote 5 answers to" in capsys.readouterr().out
    one = [json.loads(x) for x in out1.read_text().splitlines()]
    three = [json.loads(x) for x in out3.read_text().splitlines()]
    assert len(one) == len(three) == 5 and not list(tmp_path.glob("*.partial"))
    assert [r["labels"] for r in one] == ["Blue.", None, None, "No.", "1 2 3"]
    assert [r["source"] for r in one] == [f"{data}:{i}" for i in range(1, 6)]
    for r in one:
        prompt = r["messages"][:-1]
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        assert r["response"] == hf_answer(tiny, prompt), prompt
    assert one[1]["messages"][0] == {"role": "system", "content": "Be terse."}  # the row's own system
    assert three[0]["messages"][0] == {"role": "system", "content": "You are a test."}  # else --system
    for r in three:  # left-padded batches of 3 answer as each prompt alone does
        assert r["response"] == hf_answer(tiny, r["messages"][:-1])


def test_batch_inference_reads_any_training_layout_and_never_overwrites(tiny, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"query": f"q{i}", "response": f"r{i}"} for i in range(7)]),
                   str(tmp_path / "qa.parquet"), row_group_size=2)
    out = tmp_path / "answers.jsonl"
    assert run(["--model", str(tiny), *GEN, "--val_dataset", f"{tmp_path / 'qa.parquet'}#4",
                "--result_path", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["labels"].startswith("r") for r in rows)
    before = out.read_text()
    assert run(["--model", str(tiny), *GEN, "--val_dataset", str(tmp_path / "qa.parquet"),
                "--result_path", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before


def test_sampling_flags_reach_generate(tiny, capsys):
    q = ["--query", "Say something"]
    conv = [{"role": "user", "content": "Say something"}]

    def answer(*flags):
        assert run(["--model", str(tiny), *GEN, *q, *flags]) == 0
        return capsys.readouterr().out.removesuffix("\n")  # one line per answer, newlines written as \\n

    def hf(**gen):
        return hf_answer(tiny, conv, **gen).replace("\n", "\\n")

    assert answer("--repetition_penalty", "1.5") == hf(do_sample=False, repetition_penalty=1.5)
    assert answer("--repetition_penalty", "1.5") != answer()  # and it changes something here
    assert answer("--num_beams", "3") == hf(do_sample=False, num_beams=3)
    # top_k = 1 sampling can only pick the most likely token: greedy, whatever the temperature
    assert answer("--temperature", "1.3", "--top_k", "1") == hf(do_sample=False)
    hot = ["--temperature", "5", "--top_p", "1.0"]
    assert answer(*hot, "--seed", "3") == answer(*hot, "--seed", "3")  # seeded sampling repeats


def test_an_mcore_folder_is_refused_with_the_export_command(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mcore = tmp_path / "tiny mcore"  # a space: the printed command must quote it
    r = subprocess.run([sys.executable, "-m", "hpctrain", "export", "--model", str(tiny), "--to_mcore", "true",
                        "--output_dir", str(mcore), "--no_progress"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "hpctrain", "infer", "--model", str(mcore), "--query", "hi"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a megatron-core checkpoint" in r.stderr
    assert f"hpctrain export --mcore_model '{mcore}' --to_hf true --output_dir '{mcore}-hf'" in r.stderr
