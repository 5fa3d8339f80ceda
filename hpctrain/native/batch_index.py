"""Packed batch index: position_ids and cu_seqlens for a micro-batch of packed rows."""
from __future__ import annotations

import numpy as np

from hpctrain import _C
from hpctrain.native import twins
from hpctrain.native._checks import check_impl, int_array


def packed_batch_index(rows, seq_len: int | None = None, *, pad_to_multiple: int = 1,
                       impl: str = "native") -> tuple[np.ndarray, np.ndarray]:
    """position_ids and cu_seqlens for a micro-batch whose rows are packed samples.

    `rows` is either a list of rows, each a list of sample lengths, or a CSR pair
    (lengths, row_offsets) where row r holds lengths[row_offsets[r]:row_offsets[r+1]].
    Every row is `seq_len` tokens long; if seq_len is None it is the longest row rounded up to
    `pad_to_multiple` (e.g. 2*CP or 128); a given seq_len must be a multiple of pad_to_multiple.

    Returns:
      position_ids int64[b, seq_len]: 0, 1, ... restarting at 0 at every sample;
      cu_seqlens int32[nseg+1]: segment ends over the flattened b*seq_len stream, starting at 0.
    Segments are the samples of non-zero length in order; leftover tokens at the end of a row
    (padding) are ONE more segment whose positions also restart at 0. Zero-length samples add
    no segment. A row longer than seq_len raises ValueError.
    """
    check_impl(impl)
    lengths, offsets = _as_csr(rows)
    if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, (int, np.integer)) \
            or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be an int >= 1, got {pad_to_multiple!r}")
    seq_len = _resolve_seq_len(lengths, offsets, seq_len, int(pad_to_multiple))
    if impl == "python":
        return twins.packed_batch_index(lengths, offsets, seq_len)
    return _C.packed_batch_index(lengths, offsets, seq_len)


def _as_csr(rows) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(rows, tuple) and len(rows) == 2 and not np.isscalar(rows[0]) \
            and isinstance(rows[0], np.ndarray):
        lengths = int_array(rows[0], "lengths")
        offsets = int_array(rows[1], "row_offsets").astype(np.int64, copy=False)
        return lengths, offsets
    try:
        rows = [np.asarray(r) for r in rows]
    except TypeError as exc:
        raise TypeError(f"rows must be a list of per-row sample lengths or (lengths, row_offsets): {exc}") from exc
    for i, r in enumerate(rows):
        if r.size and r.dtype.kind not in "iu":
            raise TypeError(f"rows[{i}] must hold integer sample lengths, got dtype {r.dtype}")
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r.size for r in rows], out=offsets[1:])
    flat = np.concatenate([r.reshape(-1) for r in rows]).astype(np.int64) if rows else np.zeros(0, np.int64)
    return flat, offsets


def _resolve_seq_len(lengths, offsets, seq_len, multiple: int) -> int:
    if seq_len is None:
        if offsets.size < 1 or offsets[0] != 0 or offsets[-1] != lengths.size or np.any(np.diff(offsets) < 0):
            raise ValueError("row_offsets must start at 0, be non-decreasing and end at len(lengths)")
        csum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        longest = int((csum[offsets[1:]] - csum[offsets[:-1]]).max(initial=0))
        seq_len = max(multiple, -(-longest // multiple) * multiple)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if seq_len % multiple:
        raise ValueError(f"seq_len = {seq_len} is not a multiple of pad_to_multiple = {multiple}")
    return int(seq_len)
