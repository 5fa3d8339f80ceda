"""`pt` mode: documents concatenated into one token stream, cut into fixed windows (Megatron's
GPTDataset sample index, built by the native ``pt_sample_index``).

Every document is tokenized with EOS appended and stored whole in the shards (no max_length cut:
a long document simply spans several windows). The stream is the documents in plan order (seeded
by dataset_shuffle); window i is stream tokens [i*S, i*S + S] inclusive, S + 1 tokens, so the
inputs are its first S tokens and the labels its last S (consecutive windows share one token, as
in Megatron). One epoch is the (total_tokens - 1) // S windows; the tail (< S tokens) is not
trained. The loader shuffles the windows per epoch (Megatron's shuffle_idx). Every token is a
target, including the first token of the next document after an EOS.

Attention across document boundaries (Megatron's reset_position_ids / reset_attention_mask; the
config has no such flags, so ``data.packing`` stands for them, as packing means "samples never
attend to each other" everywhere else):
  packing = false  plain windows: position_ids 0..S-1, causal attention over the whole window
                   (Megatron's default; no cu_seqlens).
  packing = true   position_ids restart at 0 where a document starts inside the window and the
                   batch carries cu_seqlens over those segments (the packed contract), so
                   attention never crosses a document. Labels stay on every token.
``packing_length`` is not used in pt mode: the window is seq_length (else max_length).

Files next to the shards (all memory-mapped on read):
  pt_sample_idx.npy        int64[n+1, 2]  (position in the document order, offset) of token i*S
  pt_boundary_offsets.npy  int64[n+1]     CSR over pt_boundaries.npy
  pt_boundaries.npy        int32[...]     window-relative positions in [1, S] where a document starts
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpctrain.native import packed_batch_index, pt_sample_index

from .packing import IGNORE, _round_up, _to_torch
from .shards import TokenDataset, fsync_path

FILES = ("pt_sample_idx.npy", "pt_boundary_offsets.npy", "pt_boundaries.npy")


def write_pt_index(directory, doc_lengths: np.ndarray, seq_length: int) -> dict:
    """Build the window index of a shard directory (documents in stored order); return a summary."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    arrays = pt_sample_index(lengths, int(seq_length))
    for name, arr in zip(FILES, arrays):
        path = Path(directory) / name
        np.save(path, arr)
        fsync_path(path)
    windows = len(arrays[0]) - 1
    total = int(lengths.sum())
    return {"seq_length": int(seq_length), "windows": windows, "documents": int(len(lengths)),
            "stream_tokens": total, "unused_tail_tokens": total - (windows * int(seq_length) + 1) if windows else total}


class PtWindowDataset:
    """Window i -> (ids uint32[S+1], mask uint8[S+1], doc_starts int32[...] in [1, S])."""

    packed = False
    windows = True

    def __init__(self, base: TokenDataset, seq_length: int, *, reset_at_documents: bool = False,
                 doc_order: np.ndarray | None = None, arrays=None):
        self.base = base
        self.seq_length = int(seq_length)
        self.reset_at_documents = bool(reset_at_documents)
        self.pad_id = base.pad_id
        # doc_order None: documents in stored order, so every window is one contiguous slice
        self.doc_order = None if doc_order is None else np.asarray(doc_order, dtype=np.int64)
        if arrays is None:
            arrays = tuple(np.load(Path(base.dir) / n, mmap_mode="r") for n in FILES)
        self.sample_idx, self.boundary_offsets, self.boundaries = arrays

    @classmethod
    def build(cls, base: TokenDataset, seq_length: int, *, reset_at_documents: bool = False,
              doc_order: np.ndarray | None = None) -> "PtWindowDataset":
        """In memory, without files (e.g. another document order)."""
        order = np.arange(len(base), dtype=np.int64) if doc_order is None else doc_order
        arrays = pt_sample_index(base.lengths, int(seq_length), doc_order=order)
        return cls(base, seq_length, reset_at_documents=reset_at_documents, doc_order=doc_order, arrays=arrays)

    def __len__(self) -> int:
        return len(self.sample_idx) - 1

    def _doc(self, k: int) -> int:
        return k if self.doc_order is None else int(self.doc_order[k])

    def __getitem__(self, i: int):
        (k0, o0), (k1, o1) = self.sample_idx[i], self.sample_idx[i + 1]
        idx = self.base.index
        if self.doc_order is None:
            a, b = int(idx[k0]) + int(o0), int(idx[k1]) + int(o1) + 1
            ids, mask = np.array(self.base.tokens[a:b]), np.array(self.base.mask[a:b])
        else:
            spans = []
            for k in range(int(k0), int(k1) + 1):
                d = self._doc(k)
                a = int(idx[d]) + (int(o0) if k == k0 else 0)
                b = int(idx[d]) + int(o1) + 1 if k == k1 else int(idx[d + 1])
                spans.append((a, b))
            ids = np.concatenate([self.base.tokens[a:b] for a, b in spans])
            mask = np.concatenate([self.base.mask[a:b] for a, b in spans])
        starts = np.array(self.boundaries[self.boundary_offsets[i]:self.boundary_offsets[i + 1]])
        return ids, mask, starts


def collate_windows(items: list, pad_id: int, pad_to_multiple: int = 1, reset_at_documents: bool = False) -> dict:
    """Windows [(ids[S+1], mask[S+1], doc_starts)] -> the trainer's dict with S (rounded up) columns.

    input_ids = ids[:S]; labels[t] = ids[t+1] where mask[t+1] (every token in pt). Columns added
    by pad_to_multiple are pad_id with labels -100. reset_at_documents: position_ids restart at
    every document start and cu_seqlens mark the segments (padding is one more segment)."""
    s_win = len(items[0][0]) - 1
    s = _round_up(s_win, pad_to_multiple)
    b = len(items)
    input_ids = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), IGNORE, dtype=np.int64)
    for r, (ids, mask, _) in enumerate(items):
        if len(ids) != s_win + 1:
            raise ValueError(f"window {r} has {len(ids)} tokens, expected {s_win + 1}: mixed window lengths")
        input_ids[r, :s_win] = ids[:-1]
        # int64 first: token ids may be stored unsigned (uint32), where -100 does not fit (numpy 2)
        labels[r, :s_win] = np.where(mask[1:].astype(bool), ids[1:].astype(np.int64), IGNORE)
    if not reset_at_documents:
        position_ids = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        return _to_torch(input_ids, labels, position_ids, None)
    rows = []
    for _, _, starts in items:
        cuts = np.asarray(starts, dtype=np.int64)
        cuts = cuts[cuts < s_win]  # a document starting at S only owns the last label
        rows.append(np.diff(np.concatenate([[0], cuts, [s_win]])))
    position_ids, cu_seqlens = packed_batch_index(rows, s, pad_to_multiple=pad_to_multiple)
    return _to_torch(input_ids, labels, np.asarray(position_ids, dtype=np.int64), cu_seqlens)
