"""`hpctrain infer` on a tiny random Llama model with the real Qwen2.5 tokenizer (and its chat template).

The model is random, so the tests check the command's behaviour (one answer per query or line, greedy
decoding is deterministic, streaming prints the same text, the `<<< ` prompt on a terminal, exit 2 with a
message for a bad --model), not what it says.
"""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max_new_tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """(model dir, tokenizer) of the shared tiny Llama (tests/conftest.py)."""
    from transformers import AutoTokenizer

    return tiny_llama, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def tiny_model(tiny) -> Path:
    return tiny[0]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _cli(args: list[str], stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpctrain", "infer", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=_env(), cwd=ROOT)


def test_query_greedy_is_deterministic_and_stream_prints_same_text(tiny_model, capsys):
    from hpctrain.infer import run

    assert run(["--model", str(tiny_model), *GEN, "--query", "who are you?", "--query", "who are you?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].strip(), "no text generated"
    assert lines[0] == lines[1], "temperature 0 must give the same answer twice"

    assert run(["--model", str(tiny_model), *GEN, "--stream", "true", "--query", "who are you?"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.endswith("\n")
    assert streamed[:-1].replace("\n", "\\n") == lines[0]


def test_system_prompt_changes_the_rendered_conversation(tiny):
    from hpctrain.infer import messages

    tok = tiny[1]
    text = tok.apply_chat_template(messages("hi", "You are X."), add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nYou are X.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_pipe_of_two_lines_gives_two_answer_lines(tiny_model):
    r = _cli(["--model", str(tiny_model), *GEN], stdin="who are you?\n\nwhat can you do?\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert all(line.strip() for line in lines)


def test_bad_model_path_exits_2_with_message(tmp_path):
    r = _cli(["--model", str(tmp_path / "nope"), "--query", "hi"])
    assert r.returncode == 2
    assert "no such file or directory" in r.stderr and "nope" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli(["--model", str(tmp_path / "empty"), "--query", "hi"])
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_bad_bool_is_a_usage_error(tiny_model):
    r = _cli(["--model", str(tiny_model), "--stream", "maybe", "--query", "hi"])
    assert r.returncode == 2
    assert "expected true or false" in r.stderr and "maybe" in r.stderr


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while needle not in buf and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_prompt_on_a_terminal(tiny_model):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hpctrain", "infer", "--model", str(tiny_model), *GEN],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    os.close(slave)
    try:
        first = _read_until(master, b"<<< ", 120)
        assert b"<<< " in first, first
        os.write(master, b"who are you?\n")
        second = _read_until(master, b"<<< ", 60)
        # the echoed query, then the answer line, then the next prompt
        assert second.count(b"<<< ") == 1, second
        answer = second.split(b"who are you?", 1)[-1].replace(b"<<< ", b"").strip()
        assert answer, second
        os.write(master, b"exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        proc.stderr.close()
