"""Conversations -> input_ids + a loss mask, rendered with the tokenizer's own chat template.

Rendering is incremental: for each assistant turn i the template is rendered up to turn i-1 with
the generation prompt (the text the model sees before answering) and up to turn i (the answer
closed). The difference is the answer; it is trained up to and including its end-of-turn token
(e.g. ``<|im_end|>``), and template glue after that token (a newline) is not. The pieces are
slices of the full render, so their concatenation is byte-identical to
``tokenizer.apply_chat_template(messages, tokenize=False)``; a template whose renders are not
prefixes of each other (e.g. one that rewrites earlier turns) is refused with TemplateError.

The loss mask marks tokens that are *targets*; the collator shifts it into labels.
System prompt precedence: the row's own > DataOptions.system > the template's default.
In ``pt`` mode the text (or the turns joined by newlines) plus EOS is trained on every token, and
max_length does not apply: documents are concatenated and cut into windows (see pretrain.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .errors import DataError, SkipTally
from .formats import Conversation, normalize
from .self_cognition import fill, leftover_placeholders

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


class TemplateError(RuntimeError):
    """The chat template cannot be split into per-turn pieces (a configuration problem, never skipped)."""


@dataclass
class EncodeStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    no_loss_after_truncation: int = 0
    placeholder_rows: int = 0  # rows still holding a {{...}} after self-cognition filling
    placeholder_examples: list = field(default_factory=list)  # "where: {{X}}" of the first few

    def merge(self, o: "EncodeStats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(o, k))

    def add_placeholders(self, where: str, found: list[str]) -> None:
        self.placeholder_rows += 1
        if len(self.placeholder_examples) < 3:
            self.placeholder_examples.append(f"{where}: {' '.join(found)}")


class Encoder:
    """Row dicts -> (token ids uint32, loss mask uint8), with length handling and bad-row tally."""

    def __init__(self, tokenizer, *, mode: str = "sft", system: str | None = None, max_length: int = 2048,
                 truncation_strategy: str = "delete", model_name=(), model_author=(), strict: bool = False,
                 columns: dict | None = None):
        self.tok = tokenizer
        self.mode = mode
        self.system = system
        self.max_length = int(max_length)
        self.truncation = truncation_strategy
        self.model_name, self.model_author = list(model_name), list(model_author)
        self.strict = strict
        self.columns = dict(columns or {})  # data.columns: {name in the file: name the formats read}
        eos = tokenizer.eos_token
        self.eot = tuple(dict.fromkeys(([eos] if eos else []) + list(END_OF_TURN)))
        self.eos_id = tokenizer.eos_token_id
        if mode == "sft" and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                "sft needs one (use a chat/instruct tokenizer)")

    # -- rendering -------------------------------------------------------------------------
    def _render(self, messages: list, gen: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def pieces(self, conv: Conversation) -> list[tuple[str, bool]]:
        """[(text, trained)] whose concatenation is the full render of the conversation."""
        if self.mode == "pt":
            text = conv.text if conv.text is not None else "\n".join(m["content"] for m in conv.messages)
            return [(text, True)]
        system = conv.system if conv.system is not None else self.system
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + conv.messages
        full = self._render(msgs)
        out, pos, base = [], 0, len(msgs) - len(conv.messages)
        for i in range(base, len(msgs)):
            if msgs[i]["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], gen=True)
            upto = full if i == len(msgs) - 1 else self._render(msgs[: i + 1])
            if not (len(prompt) >= pos and full.startswith(prompt) and full.startswith(upto)
                    and len(upto) > len(prompt)):
                raise TemplateError("the chat template is not prefix-stable (rendering the first turns "
                                    "is not a prefix of rendering all of them), so assistant spans cannot "
                                    "be located; pick another template or tokenizer")
            answer = upto[len(prompt):]
            end = max((answer.rfind(t) + len(t) for t in self.eot if t in answer), default=len(answer))
            out.append((full[pos:len(prompt)], False))
            out.append((answer[:end], True))
            pos = len(prompt) + end
        out.append((full[pos:], False))
        return [p for p in out if p[0]]

    # -- encoding --------------------------------------------------------------------------
    def conversation(self, raw: dict, where: str, stats: EncodeStats | None = None) -> Conversation:
        if self.columns and isinstance(raw, dict):
            raw = {self.columns.get(k, k): v for k, v in raw.items()}
        conv = fill(normalize(raw, where, self.mode), where, self.model_name, self.model_author)
        left = leftover_placeholders(conv)
        if left and stats is not None:
            stats.add_placeholders(where, left)
        return conv

    def encode_batch(self, rows: list, tally: SkipTally, stats: EncodeStats) -> list:
        """rows: [(raw dict or DataError, where)] -> [(ids, mask) or None], in order."""
        pieces, owners = [], []
        results: list = [None] * len(rows)
        for k, (raw, where) in enumerate(rows):
            stats.rows += 1
            try:
                if isinstance(raw, DataError):
                    raise raw
                ps = self.pieces(self.conversation(raw, where, stats))
            except DataError as e:
                if self.strict:
                    raise
                tally.add(e.reason, str(e))
                continue
            for text, trained in ps:
                pieces.append(text)
                owners.append((k, trained))
        ids = self.tok(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        per_row: dict = {}
        for (k, trained), t in zip(owners, ids):
            per_row.setdefault(k, []).append((t, trained))
        for k, parts in per_row.items():
            results[k] = self._finish(parts, rows[k][1], stats)
        return results

    def _finish(self, parts: list, where: str, stats: EncodeStats):
        # one flat list and one np.repeat: a generator per token and an array per piece cost ~5% of prep
        lengths = [len(p) for p, _ in parts]
        ids = np.array(list(chain.from_iterable(p for p, _ in parts)), dtype=np.uint32)
        mask = np.repeat(np.array([tr for _, tr in parts], dtype=np.uint8), lengths)
        if self.mode == "pt" and self.eos_id is not None:
            ids = np.append(ids, np.uint32(self.eos_id))
            mask = np.append(mask, np.uint8(1))
        if len(ids) > self.max_length and self.mode != "pt":
            if self.truncation == "delete":
                stats.dropped_too_long += 1
                return None
            stats.truncated += 1
            cut = slice(len(ids) - self.max_length, None) if self.truncation == "left" else slice(0, self.max_length)
            ids, mask = ids[cut], mask[cut]
            if self.mode == "sft" and not mask[1:].any():
                stats.no_loss_after_truncation += 1
                return None
        stats.samples += 1
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask[1:].sum())
        return ids, mask
