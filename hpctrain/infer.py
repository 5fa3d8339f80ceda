"""`hpctrain infer`: chat with a Hugging Face model to check what training did.

The seed's `swift infer` flags: --model, --stream, --temperature, --max_new_tokens, --system.
Input: --query (repeatable); otherwise an interactive `<<< ` prompt when stdin is a terminal, or
one query per line from a pipe, each answered on one line. The model's own chat template renders
the conversation, so the answer is what the trained model says in deployment.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Iterator

from hpctrain.config import parse_bool as _config_bool


def parse_bool(text: str) -> bool:
    """The config's bool syntax (true/false, yes/no, on/off, 1/0) as an argparse type."""
    try:
        return _config_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpctrain infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (safetensors) or a .gguf file")
    p.add_argument("--stream", type=parse_bool, default=False, help="print tokens as they come (true/false)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--query", action="append", default=[], help="ask this and exit (repeatable)")
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=42)
    return p


def locate_model(model: str) -> tuple[Path, dict]:
    """(directory, from_pretrained kwargs) for an HF dir or a GGUF file; FileNotFoundError saying why not."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file or directory (give an HF model directory "
                                "with config.json, e.g. the --output_dir of `hpctrain export --to_hf`, "
                                "or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"--model {model}: a file that is not .gguf; give the model's directory instead")
        return path.parent, {"gguf_file": path.name}
    if (path / "config.json").exists():
        return path, {}
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"--model {model}: no config.json in this directory and not exactly one "
                                f".gguf file ({len(ggufs)} found)")
    return path, {"gguf_file": ggufs[0].name}


def load_model_and_tokenizer(model: str, dtype: str = "float32", device: str | None = None):
    """Load an HF model dir, or a GGUF file (transformers dequantises it), with its tokenizer."""
    path, kwargs = locate_model(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not kwargs:  # an HF directory (a GGUF file carries its own tokenizer)
        from hpctrain.data.tokenizer import check_tokenizer_dir

        check_tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    torch_dtype = getattr(torch, dtype)
    mdl = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return mdl.to(device).eval(), tok


def _messages(query: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": query}]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"hpctrain infer: warning: {message}", file=sys.stderr, flush=True)


def generate(model, tokenizer, query: str, *, system=None, temperature=0.0, top_p=1.0,
             max_new_tokens=512, stream=False) -> Iterator[str]:
    """Yield the answer's text: piece by piece when streaming, else once."""
    import torch
    from transformers import TextIteratorStreamer

    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(_messages(query, system), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:  # a base model without a chat template: continue the plain text
        _warn_once(f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template; "
                   "prompting with the plain text (answers of a chat model will be poor)")
        ids = tokenizer(((system + "\n") if system else "") + query, return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
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


def _answer(model, tok, query: str, args) -> str:
    pieces = []
    for piece in generate(model, tok, query, system=args.system, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, stream=args.stream):
        pieces.append(piece)
        if args.stream:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    if args.stream:
        print(flush=True)
    else:
        # One answer per line, so a pipe of N queries gives N lines.
        print(text.replace("\n", "\\n"), flush=True)
    return text


def _queries(args) -> Iterator[str]:
    if args.query:
        yield from args.query
    elif sys.stdin.isatty():
        try:  # line editing + history; also makes input() write its prompt to stdout (not stderr)
            import readline  # noqa: F401
        except ImportError:
            pass
        while True:
            try:
                line = input("<<< ")
            except EOFError:
                print()
                return
            if line.strip() in {"exit", "quit"}:
                return
            if line.strip():
                yield line
    else:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n")


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        locate_model(args.model)  # fail fast, before the slow imports
        import torch

        torch.manual_seed(args.seed)
        model, tok = load_model_and_tokenizer(args.model, args.torch_dtype, args.device)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"hpctrain infer: {e}", file=sys.stderr)
        return 2
    for q in _queries(args):
        _answer(model, tok, q, args)
    return 0
