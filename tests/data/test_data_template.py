"""Chat templates -> ids + loss mask, on the real Qwen2.5 and SmolLM2 tokenizers."""
import numpy as np
import pytest
from datahelp import qwen, smollm2

from hpctrain.data import Encoder, SkipTally, TemplateError
from hpctrain.data.formats import Conversation
from hpctrain.data.template import EncodeStats

TWO_TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
             {"role": "user", "content": "And 3+3?\nExplain."}, {"role": "assistant", "content": "6, since 3+3=6."}]


def encode(enc, row):
    res = enc.encode_batch([(row, "t:1")], SkipTally(), EncodeStats())
    return res[0]


@pytest.mark.parametrize("tokname,eot", [("qwen", "<|im_end|>"), ("smollm2", "<|im_end|>")])
def test_two_turns_byte_identical_and_labels_cover_assistant(tokname, eot):
    tok = qwen() if tokname == "qwen" else smollm2()
    enc = Encoder(tok, max_length=4096)
    conv = Conversation(messages=[dict(m) for m in TWO_TURNS])
    pieces = enc.pieces(conv)
    reference = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert "".join(p for p, _ in pieces) == reference
    assert [p for p, t in pieces if t] == ["It is 4." + eot, "6, since 3+3=6." + eot]
    ids, mask = encode(enc, {"messages": TWO_TURNS})
    assert tok.decode(ids) == reference
    # token ids equal a plain tokenization of the whole render (piece boundaries do not change BPE here)
    assert list(ids) == tok(reference, add_special_tokens=False)["input_ids"]
    # the trained tokens are exactly the two assistant spans, in order, each with its end-of-turn token
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["It is 4." + eot, "6, since 3+3=6." + eot]


def test_system_precedence_row_over_option_over_default():
    tok = qwen()
    row = {"messages": TWO_TURNS[:2]}
    default = tok.decode(encode(Encoder(tok), row)[0])
    assert "You are Qwen, created by Alibaba Cloud" in default
    opt = tok.decode(encode(Encoder(tok, system="Be brief."), row)[0])
    assert opt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Alibaba" not in opt
    own = tok.decode(encode(Encoder(tok, system="Be brief."), {**row, "system": "Row system."})[0])
    assert own.startswith("<|im_start|>system\nRow system.<|im_end|>") and "Be brief" not in own
    msgs = [{"role": "system", "content": "Msg system."}] + TWO_TURNS[:2]
    assert "Msg system." in tok.decode(encode(Encoder(tok, system="Be brief."), {"messages": msgs})[0])


def test_pt_mode_trains_every_token_and_appends_eos():
    tok = qwen()
    ids, mask = encode(Encoder(tok, mode="pt"), {"text": "Hello world."})
    assert tok.decode(ids) == "Hello world." + tok.eos_token
    assert mask.all()


def test_truncation_strategies():
    tok = qwen()
    row = {"query": "q " * 50, "response": "r " * 50}
    full, fmask = encode(Encoder(tok, max_length=4096), row)
    n = 40
    stats, tally = EncodeStats(), SkipTally()
    assert Encoder(tok, max_length=n).encode_batch([(row, "x")], tally, stats) == [None]
    assert stats.dropped_too_long == 1 and tally.total == 0
    left, lmask = encode(Encoder(tok, max_length=n, truncation_strategy="left"), row)
    assert np.array_equal(left, full[-n:]) and np.array_equal(lmask, fmask[-n:])
    # right keeps the prompt only: no loss token survives, so the sample is dropped and counted
    stats = EncodeStats()
    out = Encoder(tok, max_length=n, truncation_strategy="right").encode_batch([(row, "x")], SkipTally(), stats)
    assert out == [None] and stats.no_loss_after_truncation == 1
    right, _ = encode(Encoder(tok, max_length=len(full) - 3, truncation_strategy="right"), row)
    assert np.array_equal(right, full[: len(full) - 3])


def test_template_that_rewrites_history_is_refused():
    tok = qwen()

    class Rewriting:  # renders the number of messages up front: no render is a prefix of the next
        eos_token, eos_token_id, chat_template = tok.eos_token, tok.eos_token_id, "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return f"[{len(messages)}]" + "".join(m["content"] for m in messages)

    with pytest.raises(TemplateError, match="prefix-stable"):
        Encoder(Rewriting()).pieces(Conversation(messages=[dict(m) for m in TWO_TURNS]))


# A Llama-3-format chat template (header tokens, <|eot_id|> ends a turn, contents trimmed), written
# here for the test; applied through the Qwen tokenizer object, so only the text pieces are checked.
LLAMA3_STYLE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nDefault system.<|eot_id|>' }}{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def test_llama3_style_template_pieces():
    import copy
    tok = copy.copy(qwen())
    tok.chat_template = LLAMA3_STYLE
    pieces = Encoder(tok).pieces(Conversation(messages=[dict(m) for m in TWO_TURNS]))
    assert "".join(p for p, _ in pieces) == tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert [p for p, t in pieces if t] == ["It is 4.<|eot_id|>", "6, since 3+3=6.<|eot_id|>"]
    assert pieces[0][0].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nDefault")
    assert qwen().chat_template != LLAMA3_STYLE  # the shared tokenizer is untouched
