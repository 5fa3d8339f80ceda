"""The Hugging Face side of conversion: read safetensors (single or indexed), GGUF, write shards.

Reading is lazy: ``HfSafetensors.get(name)`` reads one tensor from its file with ``pread`` into a
fresh tensor, so a converter that asks for tensors one at a time never holds the model. (Not a
memory map: the pages a mapping touches stay in the process's RSS while the file is open, so a
mmap reader's RSS grows to the size of the shards read - 15 GB for a 7B model - even though the
kernel could reclaim them; see docs/benchmarks.md, "Checkpoint conversion (7B)".)
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from hpctrain.errors import disk_full_in
from hpctrain.files import copy_atomic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
                   "generation_config.json")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _check_safetensors_file(path: Path) -> tuple[dict, int]:
    """Header sanity: the file holds every byte its header promises (else it is truncated).
    Returns (header, offset of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes); re-download it")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, file has "
                             f"{size}); re-download it")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, tensors need "
                         f"{8 + n + end}); re-download it")
    return header, 8 + n


class HfSafetensors:
    """Tensors of an HF model directory (``model.safetensors`` or an index with shards)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir}: no {SINGLE} or {INDEX}; only safetensors HF "
                                    "checkpoints (or a GGUF file) can be converted")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._headers: dict[str, tuple[dict, int]] = {}
        for f in files:
            p = self.dir / f
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in {INDEX} is missing; download it")
            self._headers[f] = _check_safetensors_file(p)
        if weight_map is None:
            weight_map = {k: SINGLE for k in self._headers[SINGLE][0] if k != "__metadata__"}
        self.weight_map = weight_map
        self._fds: dict[str, int] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _info(self, name: str) -> dict:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        f = self.weight_map[name]
        info = self._headers[f][0].get(name)
        if info is None:
            raise KeyError(f"{self.dir / f}: tensor {name!r} (listed in {INDEX}) is not in this shard; "
                           "the index does not match the shards, re-download them")
        return info

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        st = self._info(name)["dtype"]
        if st not in _ST_DTYPES:
            raise ValueError(f"{self.dir}: tensor {name!r} has safetensors dtype {st}, which the "
                             f"converter does not read (supported: {', '.join(sorted(_ST_DTYPES))})")
        return _ST_DTYPES[st]

    def get(self, name: str) -> torch.Tensor:
        info, f = self._info(name), self.weight_map[name]
        t = torch.empty(self.shape(name), dtype=self.dtype(name))
        start, end = info["data_offsets"]
        buf = memoryview(t.view(torch.uint8).reshape(-1).numpy())
        if len(buf) != end - start:
            raise ValueError(f"{self.dir / f}: tensor {name!r} has {end - start} bytes, its shape and "
                             f"dtype need {len(buf)}; the file is corrupt, re-download it")
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(self.dir / f, os.O_RDONLY)
        pos, done = self._headers[f][1] + start, 0
        while done < len(buf):  # one read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [buf[done:]], pos + done)
            if n == 0:
                raise ValueError(f"{self.dir / f}: file ended inside tensor {name!r}; re-download it")
            done += n
        return t

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class InMemoryTensors:
    """Same interface over a state dict already in memory (GGUF input)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], where: str):
        self.sd, self.dir = state_dict, where

    def names(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._t(name)

    def _t(self, name: str) -> torch.Tensor:
        if name not in self.sd:
            raise KeyError(f"{self.dir}: tensor {name!r} is not in the model")
        return self.sd[name]


def find_gguf(model: str | os.PathLike) -> Path | None:
    """The GGUF file ``model`` names (a .gguf file, or a dir holding exactly one), else None."""
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{p} holds several GGUF files ({', '.join(f.name for f in found)}); "
                             "pass one file with --model")
        return found[0] if found else None
    return None


def load_gguf(path: Path, dtype: torch.dtype | None = None):
    """(hf_config dict, InMemoryTensors, tokenizer) of a GGUF file, dequantised by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpctrain.model.families import model_args

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = model.config.to_dict()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if not model_args(cfg, str(path))["untie_embeddings_and_output_weights"]:
        sd.pop("lm_head.weight", None)  # tied: transformers exposes the embedding a second time
    return cfg, InMemoryTensors(sd, str(path)), tok


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``src`` to ``dst`` (each atomically)."""
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            copy_atomic(p, Path(dst) / name)
            copied.append(name)
    return copied


def _save_shard(tensors: dict, path: Path) -> None:
    """safetensors' save_file; its SafetensorError for a full disk becomes an OSError naming the file."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as e:  # noqa: BLE001 - SafetensorError carries the OS error only as text
        full = disk_full_in(e)
        if full is not None:
            raise OSError(full.errno, os.strerror(full.errno), str(path)) from None
        raise


def write_safetensors_shards(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write (name, tensor) pairs as ``model-0000i-of-0000N.safetensors`` + the index, streaming.

    At most one shard's tensors are held at a time. Returns the shard file names.
    """
    out = Path(out_dir)
    tmp_names, weight_map, total, buf, size = [], {}, 0, {}, 0

    def flush():
        nonlocal buf, size
        if not buf:
            return
        name = f"shard-{len(tmp_names):05d}.tmp"
        _save_shard(buf, out / name)
        for k in buf:
            weight_map[k] = name
        tmp_names.append(name)
        buf, size = {}, 0

    for name, t in tensors:
        n = t.numel() * t.element_size()
        if buf and size + n > max_shard_bytes:
            flush()
        buf[name] = t.contiguous()
        size += n
        total += n
    flush()
    final = {t: f"model-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors" for i, t in enumerate(tmp_names)}
    for t, f in final.items():
        os.replace(out / t, out / f)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return list(final.values())


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    src = HfSafetensors(model_dir)
    for n in src.names():
        yield n, src.get(n)
