"""`hpctrain infer`: generate with a Hugging Face model to check what training did.

`swift infer`'s flags: --model, --stream, --max_new_tokens, --temperature, --top_k, --top_p,
--repetition_penalty, --num_beams, --seed, --system, --val_dataset/--result_path/--max_batch_size.
Input: --query (repeatable); --val_dataset (batch inference over dataset files into a JSONL of
answers, see batch.py); otherwise an interactive `<<< ` prompt when stdin is a terminal, or one
query per line from a pipe, each answered on one line. The model's own chat template renders the
conversation, so the answer is what the trained model says in deployment.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from hpctrain.cli_args import CommandLine, flag
from hpctrain.infer.generate import Sampling, generate, messages
from hpctrain.infer.model import load_model_and_tokenizer, locate_model

SAMPLING_FLAGS = [
    flag("--max_new_tokens", type=int, default=512, help="answer length limit in tokens"),
    flag("--temperature", type=float, default=0.0, help="0 means greedy decoding"),
    flag("--top_k", type=int, help="sample from the k most likely tokens (default: the model's generation_config)"),
    flag("--top_p", type=float, default=1.0, help="nucleus sampling mass"),
    flag("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens"),
    flag("--num_beams", type=int, default=1, help="beam search width (1 = none)"),
]


def command_line() -> CommandLine:
    return CommandLine("hpctrain infer", __doc__.split("\n\n")[0], mode="infer", flags=[
        flag("--model", required=True, config="model.model",
             help="HF model directory (safetensors) or a .gguf file"),
        flag("--adapters", kind="list", default=[], config="tuner.adapters",
             help="a PEFT LoRA adapter folder to answer with (merged into --model's weights)"),
        flag("--stream", kind="bool", default=False, help="print tokens as they come"),
        *SAMPLING_FLAGS,
        flag("--seed", type=int, default=42, help="torch seed (sampling)"),
        flag("--system", config="data.system", help="system prompt (default: the template's own)"),
        flag("--query", kind="list", default=[], help="ask this and exit (repeatable)"),
        flag("--val_dataset", kind="list", default=[],
             help="batch inference: dataset specs 'path[:subset][#N]' (any format and layout training reads)"),
        flag("--result_path", help="batch inference output JSONL (default: MODEL/infer_result/<time>.jsonl)"),
        flag("--max_batch_size", type=int, default=16, help="batch inference: prompts generated together"),
        flag("--torch_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
             help="weight dtype for inference"),
        flag("--device", help="cpu / cuda (default: cuda when available)"),
        flag("--infer_backend", default="pt", choices=("pt",), help="transformers (vllm/sglang/lmdeploy: not here)"),
    ])


def sampling_of(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams)


def _answer(model, tok, query: str, args) -> str:
    pieces = []
    for piece in generate(model, tok, messages(query, args.system), sampling_of(args), stream=args.stream):
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


def _batch(model, tok, args) -> int:
    from hpctrain.data.errors import DataError
    from hpctrain.infer.batch import default_result_path, infer_dataset

    out = Path(args.result_path) if args.result_path else default_result_path(args.model)
    try:
        n = infer_dataset(model, tok, args.val_dataset, out, sampling_of(args), system=args.system,
                          max_batch_size=args.max_batch_size, seed=args.seed)
    except (DataError, FileExistsError) as e:
        print(f"hpctrain infer: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} answers to {out}")
    return 0


def run(argv: list[str]) -> int:
    args = command_line().parse(argv)
    try:
        locate_model(args.model)  # fail fast, before the slow imports
        import torch

        torch.manual_seed(args.seed)
        model, tok = load_model_and_tokenizer(args.model, args.torch_dtype, args.device)
        if args.adapters:
            from hpctrain.infer.adapters import apply_adapter

            if len(args.adapters) > 1:
                raise ValueError(f"--adapters {' '.join(args.adapters)}: give one adapter folder")
            n = apply_adapter(model, args.adapters[0])
            print(f"[adapter {args.adapters[0]}: {n} linears merged]", file=sys.stderr)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"hpctrain infer: {e}", file=sys.stderr)
        return 2
    if args.val_dataset:
        return _batch(model, tok, args)
    for q in _queries(args):
        _answer(model, tok, q, args)
    return 0
