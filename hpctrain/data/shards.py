"""Token shards on disk: write them streaming, read them memory-mapped.

A split directory holds
  tokens.bin   uint32, every sample's token ids back to back
  mask.bin     uint8, 1 where the token is a training target (the collator shifts it into labels)
  index.npy    int64[n+1], sample i is tokens[index[i]:index[i+1]]
  packing.npz  (when packed) bin_offsets int64[nbins+1] and order int64[n] (CSR bins of samples)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Appends samples to tokens.bin / mask.bin; close() writes index.npy and fsyncs everything."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tok = open(self.dir / "tokens.bin", "wb")
        self._mask = open(self.dir / "mask.bin", "wb")
        self.lengths: list = []

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self._tok.write(np.ascontiguousarray(ids, dtype=np.uint32).tobytes())
        self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.lengths.append(len(ids))

    def close(self) -> np.ndarray:
        for f in (self._tok, self._mask):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        index = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self.lengths, dtype=np.int64), out=index[1:])
        np.save(self.dir / "index.npy", index)
        fsync_path(self.dir / "index.npy")
        return index


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenDataset:
    """Sample i -> (ids uint32[L], mask uint8[L]); backed by memory-mapped shards."""

    packed = False

    def __init__(self, directory, pad_id: int = 0):
        d = Path(directory)
        self.dir = d
        self.tokens = _memmap(d / "tokens.bin", np.uint32)
        self.mask = _memmap(d / "mask.bin", np.uint8)
        self.index = np.load(d / "index.npy")
        self.pad_id = int(pad_id)
        if self.index[-1] != len(self.tokens) or len(self.mask) != len(self.tokens):
            raise ValueError(f"{d}: shards are inconsistent (index says {self.index[-1]} tokens, "
                             f"tokens.bin has {len(self.tokens)}, mask.bin {len(self.mask)}); re-run prep")

    def __len__(self) -> int:
        return len(self.index) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.index)

    def __getitem__(self, i: int):
        a, b = int(self.index[i]), int(self.index[i + 1])
        return np.array(self.tokens[a:b]), np.array(self.mask[a:b])


class PackedDataset:
    """Bin i -> list of samples (ids, mask) from a TokenDataset, packed by the native packer."""

    packed = True

    def __init__(self, base: TokenDataset, bin_offsets: np.ndarray, order: np.ndarray, capacity: int):
        self.base = base
        self.bin_offsets = np.asarray(bin_offsets, dtype=np.int64)
        self.order = np.asarray(order, dtype=np.int64)
        self.capacity = int(capacity)
        self.pad_id = base.pad_id

    def __len__(self) -> int:
        return len(self.bin_offsets) - 1

    def __getitem__(self, i: int) -> list:
        a, b = int(self.bin_offsets[i]), int(self.bin_offsets[i + 1])
        return [self.base[int(j)] for j in self.order[a:b]]
