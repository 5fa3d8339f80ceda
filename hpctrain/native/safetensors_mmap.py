"""Memory-mapped, zero-copy numpy views of the tensors in a .safetensors file.

The re-layout helpers read straight from these views, so converting a checkpoint touches only the
pages it copies. bfloat16 tensors come back as uint16 arrays (raw 2-byte elements); copy them into
a torch bf16 tensor (or another uint16/int16 view) with hpctrain.native's helpers.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where tensor data starts)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise ValueError(f"{path}: header size {size} is implausible; not a safetensors file?")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    return header, 8 + size


def mmap_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only np.memmap view of that tensor (BF16 as uint16), no data read yet."""
    path = Path(path)
    header, start = read_header(path)
    file_size = path.stat().st_size
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, "
                             f"supported: {sorted(_DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * np.dtype(dtype).itemsize or start + end > file_size:
            raise ValueError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match shape {shape} "
                             f"{info['dtype']} or run past the end of the file")
        if count == 0:
            out[name] = np.zeros(shape, dtype)
            continue
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out
