"""Packing: group samples into rows of at most `capacity` tokens with the native BFD packer,
and collate micro-batches (padded or packed) into the trainer's contract-3 dict.

Labels are the loss mask shifted by one inside each sample: labels[t] = ids[t+1] where token
t+1 is a target, else -100; the last position of every sample is -100, so no loss crosses a
sample boundary. Packed rows restart position_ids at 0 per sample and carry cu_seqlens (int32)
over the flattened b*s stream, with a row's trailing padding as its own segment.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hpctrain.native import fill_ratio, pack_sequences, packed_batch_index

from .shards import fsync_path

IGNORE = -100


def pack_split(directory, lengths: np.ndarray, capacity: int) -> dict:
    """Pack the samples of a shard directory; writes packing.npz and returns a summary."""
    bin_offsets, order = pack_sequences(np.asarray(lengths, dtype=np.int64), int(capacity))
    path = Path(directory) / "packing.npz"
    with open(path, "wb") as f:
        np.savez(f, bin_offsets=np.asarray(bin_offsets), order=np.asarray(order), capacity=np.int64(capacity))
    fsync_path(path)
    return {"bins": int(len(bin_offsets) - 1), "capacity": int(capacity),
            "fill_ratio": float(fill_ratio(lengths, bin_offsets, int(capacity))) if len(lengths) else 0.0}


def load_packing(directory) -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(Path(directory) / "packing.npz", allow_pickle=False) as z:
        return z["bin_offsets"], z["order"], int(z["capacity"])


def _labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lab = np.full(len(ids), IGNORE, dtype=np.int64)
    if len(ids) > 1:
        tgt = mask[1:].astype(bool)
        lab[:-1][tgt] = ids[1:][tgt]
    return lab


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def collate_padded(samples: list, pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Unpacked samples [(ids, mask)] -> rows padded to the longest (rounded up to a multiple)."""
    s = _round_up(max(len(ids) for ids, _ in samples), pad_to_multiple)
    b = len(samples)
    input_ids = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), IGNORE, dtype=np.int64)
    for r, (ids, mask) in enumerate(samples):
        input_ids[r, :len(ids)] = ids
        labels[r, :len(ids)] = _labels(ids, mask)
    position_ids = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
    return _to_torch(input_ids, labels, position_ids, None)


def collate_packed(bins: list, pad_id: int, pad_to_multiple: int = 1, seq_len: int | None = None) -> dict:
    """Packed rows (each a list of samples) -> one row per bin, with cu_seqlens."""
    rows = [[len(ids) for ids, _ in row] for row in bins]
    position_ids, cu_seqlens = packed_batch_index(rows, seq_len, pad_to_multiple=pad_to_multiple)
    b, s = position_ids.shape
    input_ids = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), IGNORE, dtype=np.int64)
    for r, row in enumerate(bins):
        pos = 0
        for ids, mask in row:
            input_ids[r, pos:pos + len(ids)] = ids
            labels[r, pos:pos + len(ids)] = _labels(ids, mask)
            pos += len(ids)
    return _to_torch(input_ids, labels, np.asarray(position_ids, dtype=np.int64), cu_seqlens)


def _to_torch(input_ids, labels, position_ids, cu_seqlens) -> dict:
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(np.ascontiguousarray(position_ids))}
    if cu_seqlens is not None:
        batch["cu_seqlens"] = torch.from_numpy(np.asarray(cu_seqlens, dtype=np.int32).copy())
    batch["num_loss_tokens"] = int((labels != IGNORE).sum())
    return batch
