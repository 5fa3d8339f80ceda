"""`hpctrain prep config.toml`: tokenize + template + pack once into memory-mapped shards.

Layout of ``data.prep_dir``::

    manifest.json   config fingerprint (inputs + hash), counts, skip summary, packing summary
    train/          tokens.bin, mask.bin, index.npy[, packing.npz]   (see shards.py)
                    pt mode: pt_*.npy, the window index, instead of packing.npz (pretrain.py)
    valid/          same, when there is a validation split

One process writes everything into ``<prep_dir>.tmp-<pid>``, fsyncs it and renames it into place,
so a reader sees either no directory or a complete one. Re-running with the same fingerprint
reuses the shards; a different one is refused with the list of what changed. Training on N
nodes memory-maps the shards instead of each node re-processing the data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .errors import DataError
from .mixing import build_row_plans
from .options import DataOptions
from .packing import load_packing, pack_split
from .pipeline import tokenize_to_shards
from .pretrain import PtWindowDataset, write_pt_index
from .shards import PackedDataset, TokenDataset, fsync_path
from . import layouts
from .sources import local_path, parse_spec
from .template import Encoder
from .tokenizer import tokenizer_files

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: pt mode stores whole documents + a window index
TOKEN_FIELDS = ("mode", "max_length", "truncation_strategy", "system", "model_name", "model_author", "seed",
                "split_dataset_ratio", "dataset_shuffle", "packing", "strict")
OPTIONAL_TOKEN_FIELDS = ("columns", "val_dataset_shuffle")


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _spec_stamp(raw: str) -> dict:
    path = local_path(parse_spec(raw))
    p = Path(path)
    if p.is_file():
        return {"spec": raw, **_file_stamp(p)}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
        [Path(f) for f in layouts.expand_glob(path)] if layouts.GLOB_CHARS.search(path) else []
    if files:
        return {"spec": raw, "files": {str(f.relative_to(p) if p.is_dir() else f): _file_stamp(f) for f in files}}
    return {"spec": raw}


def _tokenizer_stamp(source: str | None, tokenizer) -> dict:
    h = hashlib.sha256()
    for f in tokenizer_files(source) if source else []:
        if f.stat().st_size > 64 << 20:  # a GGUF holds the weights too: stamp it instead of hashing it
            h.update(json.dumps({f.name: _file_stamp(f)}).encode())
        else:
            h.update(f.name.encode() + f.read_bytes())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(str(len(tokenizer)).encode())
    # contents only: the same tokenizer named by another path (relative / absolute) still matches
    return {"sha256": h.hexdigest()}


def fingerprint(opts: DataOptions, tokenizer, tokenizer_source: str | None) -> dict:
    """Everything that affects the tokens, and its hash."""
    inputs = {"format_version": FORMAT_VERSION,
              "dataset": [_spec_stamp(s) for s in opts.dataset],
              "val_dataset": [_spec_stamp(s) for s in opts.val_dataset],
              "packing_length": opts.capacity if opts.packing and opts.mode == "sft" else None,
              "pt_seq_length": opts.window if opts.mode == "pt" else None,
              "tokenizer": _tokenizer_stamp(tokenizer_source, tokenizer)}
    inputs.update({k: getattr(opts, k) for k in TOKEN_FIELDS})
    # Later additions, only when set: shards prepared before them keep their fingerprint.
    inputs.update({k: getattr(opts, k) for k in OPTIONAL_TOKEN_FIELDS if getattr(opts, k)})
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {"hash": digest, "inputs": inputs}


def _changes(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_reusable(out_dir: Path, fp: dict) -> bool:
    """True when out_dir holds shards of this fingerprint; raise when it holds others."""
    manifest = out_dir / "manifest.json"
    if not out_dir.exists():
        return False
    if not manifest.exists():
        raise DataError(f"{out_dir} exists but holds no manifest.json (not hpctrain shards, or an interrupted "
                        "write): remove it or choose another data.prep_dir", "prep")
    old = json.loads(manifest.read_text(encoding="utf-8"))
    if old.get("fingerprint", {}).get("hash") == fp["hash"]:
        return True
    changed = _changes(old.get("fingerprint", {}).get("inputs", {}), fp["inputs"])
    raise DataError(f"{out_dir} holds shards prepared with a different config; changed: " + "; ".join(changed)
                    + ". Use another data.prep_dir, or delete this one to re-prepare.", "prep")


def _encoder(opts: DataOptions, tokenizer) -> Encoder:
    max_len = min(opts.max_length, opts.capacity) if opts.packing else opts.max_length
    return Encoder(tokenizer, mode=opts.mode, system=opts.system, max_length=max_len,
                   truncation_strategy=opts.truncation_strategy, model_name=opts.model_name,
                   model_author=opts.model_author, strict=opts.strict, columns=opts.columns)


def prepare(opts: DataOptions, tokenizer, out_dir, tokenizer_source: str | None = None) -> dict:
    """Write shards for `opts` into out_dir (atomically) unless identical ones exist; return the manifest."""
    out_dir = Path(out_dir)
    fp = fingerprint(opts, tokenizer, tokenizer_source)
    if check_reusable(out_dir, fp):
        log.info("prep: reusing %s (config hash %s)", out_dir, fp["hash"][:12])
        return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    t0 = time.time()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_plan, valid_plan = build_row_plans(opts)
    encoder = _encoder(opts, tokenizer)
    manifest = {"fingerprint": fp, "pad_id": pad_id_of(tokenizer), "splits": {}}
    try:
        for name, plan in (("train", train_plan), ("valid", valid_plan)):
            if plan is not None:
                manifest["splits"][name] = _prepare_split(name, plan, encoder, tmp / name, opts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an error leaves no half-written directory behind
        raise
    manifest["seconds"] = round(time.time() - t0, 2)
    _write_json(tmp / "manifest.json", manifest)
    fsync_path(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out_dir)
    fsync_path(out_dir.parent)
    return manifest


def _prepare_split(name: str, plan, encoder: Encoder, directory: Path, opts: DataOptions) -> dict:
    index, tally, stats = tokenize_to_shards(plan, encoder, directory, opts.dataset_num_proc, desc=name)
    info = {"rows": len(plan), **stats.__dict__, "skipped": tally.to_dict()}
    _log_summary(name, len(plan), tally, stats, opts)
    if opts.mode == "pt":
        info["pt"] = _pt_split(name, directory, index, opts)
    elif opts.packing:
        info["packing"] = pack_split(directory, index[1:] - index[:-1], opts.capacity)
        log.info("%s: packed %d samples into %d rows of %d tokens (fill %.1f%%)", name, stats.samples,
                 info["packing"]["bins"], opts.capacity, 100 * info["packing"]["fill_ratio"])
    return info


def _pt_split(name: str, directory: Path, index, opts: DataOptions) -> dict:
    info = write_pt_index(directory, index[1:] - index[:-1], opts.window)
    if info["windows"] == 0 and name == "train":
        raise DataError(f"pt: the training documents hold {info['stream_tokens']} tokens, fewer than one window "
                        f"of seq_length + 1 = {opts.window + 1}: add data or lower data.seq_length / max_length",
                        "prep")
    log.info("%s: %d documents, %d tokens -> %d windows of %d+1 tokens per epoch (%d tail tokens unused; "
             "%s)", name, info["documents"], info["stream_tokens"], info["windows"], opts.window,
             info["unused_tail_tokens"], "attention reset at document starts" if opts.packing
             else "attention across documents")
    return info


def _log_summary(name: str, rows: int, tally, stats, opts: DataOptions) -> None:
    log.info("%s: %s", name, tally.summary(rows))
    if stats.dropped_too_long:
        log.info("%s: %d samples longer than max_length=%d dropped (truncation_strategy=delete)",
                 name, stats.dropped_too_long, opts.max_length)
    if stats.truncated:
        log.info("%s: %d samples truncated (%s); %d of them lost every loss token and were dropped", name,
                 stats.truncated, opts.truncation_strategy, stats.no_loss_after_truncation)
    log.info("%s: %d samples, %d tokens, %d loss tokens", name, stats.samples, stats.tokens, stats.loss_tokens)
    if stats.placeholder_rows:
        log.warning("%s: %d rows still hold a {{...}} placeholder after filling {{NAME}}/{{AUTHOR}} (the model "
                    "would learn the braces): %s; fix the rows or the dataset", name, stats.placeholder_rows,
                    " | ".join(stats.placeholder_examples))


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else (tokenizer.eos_token_id or 0))


def open_prepared(out_dir, packed: bool | None = None):
    """(train, valid) datasets memory-mapped from a prep directory; valid is None when absent.
    pt mode gives PtWindowDataset (packed: document resets), sft TokenDataset / PackedDataset."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    pad = int(manifest["pad_id"])
    inputs = manifest["fingerprint"]["inputs"]
    packing = inputs["packing"] if packed is None else packed
    out = []
    for name in ("train", "valid"):
        if name not in manifest["splits"]:
            out.append(None)
            continue
        base = TokenDataset(out_dir / name, pad)
        if inputs["mode"] == "pt":  # packing: reset position_ids / attention at document starts
            base = PtWindowDataset(base, inputs["pt_seq_length"], reset_at_documents=packing)
        elif packing:
            bins, order, cap = load_packing(out_dir / name)
            base = PackedDataset(base, bins, order, cap)
        out.append(base)
    return out[0], out[1]


def command_line():
    from hpctrain.cli_args import CommandLine, flag

    return CommandLine("hpctrain prep", __doc__.splitlines()[0], mode="prep", all_keys=True, flags=[
        flag("--mode", choices=("sft", "pt"), default="sft", help="tokenize for sft (templates) or pt (plain text)")])


def run(argv: list[str]) -> int:
    """`hpctrain prep [config.toml] [--mode sft|pt] [--key value ...]`."""
    from .tokenizer import load_tokenizer

    args = command_line().parse(argv)
    logging.basicConfig(level=logging.INFO, format="[prep] %(message)s")
    try:
        cfg = args.cfg
        opts = DataOptions.from_config(cfg, mode=args.mode)
        if not opts.prep_dir:
            raise DataError("data.prep_dir is not set: say where the shards go (--prep_dir DIR)", "prep")
        source = cfg.model.model
        if not source:
            raise DataError("model.model is not set: prep needs the model's tokenizer (--model HF_DIR|FILE.gguf)",
                            "prep")
        manifest = prepare(opts, load_tokenizer(source), opts.prep_dir, source)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"hpctrain prep: error: {e}")
        return 2
    for name, info in manifest["splits"].items():
        print(f"{name}: {info['samples']} samples, {info['tokens']} tokens -> {Path(opts.prep_dir) / name}")
    print(f"config hash {manifest['fingerprint']['hash'][:12]}")
    return 0
