"""Generation with transformers' ``generate``: the sampling settings of `swift infer`, one prompt
(optionally streamed) or a batch of prompts (left-padded, one ``generate`` call per batch)."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Sampling:
    """`swift infer`'s sampling flags. temperature 0 means greedy decoding (the other sampling
    settings are then unused); top_k None keeps the model's generation_config value."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1

    def generate_kwargs(self, tokenizer) -> dict:
        gen = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                   num_beams=self.num_beams,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else tokenizer.eos_token_id)
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            if self.top_k is not None:
                gen["top_k"] = self.top_k
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return gen


def messages(query: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": query}]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"hpctrain infer: warning: {message}", file=sys.stderr, flush=True)


def prompt_text(tokenizer, conversation: list[dict]) -> str:
    """The conversation rendered by the model's own chat template, ready for the answer."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # a base model without a chat template: continue the plain text
    _warn_once(f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template; "
               "prompting with the plain text (answers of a chat model will be poor)")
    return "\n".join(m["content"] for m in conversation)


def _encode(tokenizer, texts: list[str], device) -> dict:
    if tokenizer.pad_token is None and len(texts) > 1:  # e.g. Llama: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    # The template already holds the special tokens (BOS, <|im_start|>, ...): add none twice.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return {k: v.to(device) for k, v in enc.items()}


def generate(model, tokenizer, conversation: list[dict], sampling: Sampling, stream: bool = False) -> Iterator[str]:
    """Yield the answer's text: piece by piece when streaming, else once."""
    import torch
    from transformers import TextIteratorStreamer

    ids = _encode(tokenizer, [prompt_text(tokenizer, conversation)], model.device)
    gen = sampling.generate_kwargs(tokenizer)
    if not stream:
        with torch.no_grad():
            out = model.generate(**ids, **gen)
        yield tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=lambda: model.generate(**ids, **gen, streamer=streamer))
    with torch.no_grad():
        worker.start()
        yield from streamer
        worker.join()


def generate_batch(model, tokenizer, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
    """One answer per conversation, generated together (left padding keeps every prompt's end aligned)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        ids = _encode(tokenizer, [prompt_text(tokenizer, c) for c in conversations], model.device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**ids, **sampling.generate_kwargs(tokenizer))
    start = ids["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]
