"""Benchmark `hpctrain prep` against a plain HF `datasets.map` tokenization of the same rows.

    python tools/bench/bench_prep.py --rows 100000 --num-proc 2 [--which ours|hf|both] [--progress]

Rows: the bundled alpaca-gpt4-en set replicated to --rows ('alpaca_gpt4_en.jsonl#N': whole copies,
then a seeded remainder). Tokenizer: the Qwen2.5 tokenizer in tests/fixtures. Ours renders with
the chat template, builds the loss mask, drops over-long rows, packs and streams shards to disk;
the HF baseline applies the same chat template and tokenizes (no labels, no packing) with
`datasets.map(batched=True, num_proc=N)` into an in-memory Arrow table. Each side runs in its own
process; peak RSS is the max over that process and its workers. Prints one JSON line per side.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EN = ROOT / "hpctrain" / "assets" / "data" / "alpaca_gpt4_en.jsonl"
TOK = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def bench_ours(rows: int, num_proc: int, max_length: int) -> dict:
    from hpctrain.data import DataOptions, load_tokenizer, prepare

    tok = load_tokenizer(str(TOK))
    with tempfile.TemporaryDirectory() as tmp:
        opts = DataOptions(dataset=[f"{EN}#{rows}"], max_length=max_length, packing=True,
                           dataset_num_proc=num_proc, prep_dir=f"{tmp}/shards")
        t0 = time.perf_counter()
        man = prepare(opts, tok, opts.prep_dir, str(TOK))
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    tr = man["splits"]["train"]
    return {"side": "hpctrain prep", "rows": rows, "num_proc": num_proc, "seconds": round(dt, 1),
            "rows_per_s": round(rows / dt), "tokens": tr["tokens"], "tokens_per_s": round(tr["tokens"] / dt),
            "samples": tr["samples"], "dropped_too_long": tr["dropped_too_long"],
            "packed_rows": tr["packing"]["bins"], "shard_bytes": size, "peak_rss_mib": round(peak_rss_mib())}


def bench_hf(rows: int, num_proc: int, progress: bool = False) -> dict:
    import datasets
    from transformers import AutoTokenizer

    if not progress:
        datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(TOK))
    base = datasets.load_dataset("json", data_files=str(EN), split="train", keep_in_memory=True)
    copies, rest = divmod(rows, len(base))
    ds = datasets.concatenate_datasets([base] * copies + [base.select(range(rest))])

    def encode(batch):
        texts = []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            q = f"{ins}\n{inp}" if inp else ins
            texts.append(tok.apply_chat_template([{"role": "user", "content": q},
                                                  {"role": "assistant", "content": out}], tokenize=False))
        return tok(texts, add_special_tokens=False)

    t0 = time.perf_counter()
    out = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                 keep_in_memory=True)
    dt = time.perf_counter() - t0
    ntok = sum(len(x) for x in out["input_ids"])
    return {"side": "datasets.map", "rows": rows, "num_proc": num_proc, "seconds": round(dt, 1),
            "rows_per_s": round(rows / dt), "tokens": ntok, "tokens_per_s": round(ntok / dt),
            "peak_rss_mib": round(peak_rss_mib())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--which", choices=("ours", "hf", "both"), default="both")
    ap.add_argument("--progress", action="store_true",
                    help="HF side: leave the datasets progress bars on (stderr), to follow a long run")
    a = ap.parse_args()
    if a.which == "both":  # each side in a fresh process so peak RSS is its own
        for side in ("ours", "hf"):
            subprocess.check_call([sys.executable, __file__, "--rows", str(a.rows), "--num-proc",
                                   str(a.num_proc), "--max-length", str(a.max_length), "--which", side]
                                  + (["--progress"] if a.progress else []))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = bench_ours(a.rows, a.num_proc, a.max_length) if a.which == "ours" else \
        bench_hf(a.rows, a.num_proc, a.progress)
    res["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
