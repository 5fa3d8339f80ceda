"""Pretraining sample index: fixed windows over a concatenated document stream."""
from __future__ import annotations

import numpy as np

from hpctrain import _C
from hpctrain.native import twins
from hpctrain.native._checks import check_impl, int_array


def pt_sample_index(doc_lengths, seq_length: int, *, doc_order=None, num_samples: int | None = None,
                    impl: str = "native") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Megatron-style sample index over documents concatenated in `doc_order` (default 0..n-1).

    The token stream is doc_lengths[doc_order[0]] tokens of one document, then the next, ...
    Window i covers stream tokens [i*seq_length, i*seq_length + seq_length] inclusive, i.e.
    seq_length + 1 tokens (inputs plus the shifted labels), so consecutive windows overlap by one
    token. `doc_order` may repeat documents (epochs) or shuffle them. num_samples defaults to
    the most windows that fit, (total_tokens - 1) // seq_length.

    Returns (sample_idx, boundary_offsets, boundaries):
      sample_idx int64[num_samples+1, 2]: (k, offset) where stream token i*seq_length is token
        `offset` of document doc_order[k] (k indexes doc_order, as in Megatron); window i runs
        from sample_idx[i] through sample_idx[i+1] inclusive.
      boundary_offsets int64[num_samples+1] and boundaries int32[...] (CSR): window i's entries
        boundaries[boundary_offsets[i]:boundary_offsets[i+1]] are the positions p in
        [1, seq_length] of the window where a new non-empty document starts. Position ids
        restart there, and attention must not cross them; p == seq_length means only the last
        label belongs to the next document.
    All offsets are int64, so streams of billions of tokens are fine.
    """
    check_impl(impl)
    lengths = int_array(doc_lengths, "doc_lengths")
    order = np.arange(len(lengths), dtype=np.int64) if doc_order is None else int_array(doc_order, "doc_order")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    if num_samples is not None and (not isinstance(num_samples, (int, np.integer)) or num_samples < 0):
        raise ValueError(f"num_samples must be an int >= 0 or None, got {num_samples!r}")
    n = -1 if num_samples is None else int(num_samples)
    if impl == "python":
        return twins.pt_sample_index(lengths, order, int(seq_length), n)
    return _C.pt_sample_index(lengths, order, int(seq_length), n)

