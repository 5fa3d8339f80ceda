"""Sequence packing: best-fit-decreasing assignment of samples to bins of `capacity` tokens."""
from __future__ import annotations

import numpy as np

from hpctrain import _C
from hpctrain.native import twins
from hpctrain.native._checks import check_impl, int_array


def pack_sequences(lengths, capacity: int, *, truncate: bool = False,
                   impl: str = "native") -> tuple[np.ndarray, np.ndarray]:
    """Pack samples of the given lengths into as few bins of `capacity` tokens as BFD finds.

    Rule (native and twin agree exactly): visit samples longest first (equal lengths by index,
    ascending); put each into the open bin with the smallest remaining capacity that fits it
    (among equals, the bin that most recently reached that remaining capacity); open a new bin
    when none fits. Bins are numbered in opening order.

    Returns (bin_offsets, order), both int64, CSR style: bin b holds the sample indices
    order[bin_offsets[b]:bin_offsets[b+1]] (longest first). Native arrays are zero-copy.

    Samples longer than `capacity` raise ValueError (how many, and the longest) unless
    truncate=True, in which case each counts as `capacity` tokens (a full bin of its own).
    Cost: O(n + capacity) time, O(n + capacity) memory (native capacity limit 2**24 tokens).
    """
    check_impl(impl)
    lengths = int_array(lengths, "lengths")
    capacity = _check_capacity(capacity)
    if impl == "python":
        return twins.pack_sequences(lengths, capacity, truncate=truncate)
    return _C.pack_sequences(lengths, capacity, truncate)


def fill_ratio(lengths, bin_offsets: np.ndarray, capacity: int) -> float:
    """Tokens placed / (bins * capacity), with over-long samples counted as `capacity`."""
    nbins = len(bin_offsets) - 1
    if nbins == 0:
        return 1.0
    tokens = np.minimum(np.asarray(lengths, dtype=np.int64), capacity).sum()
    return float(tokens) / float(nbins * capacity)


def _check_capacity(capacity) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0 tokens, got {capacity}")
    return int(capacity)
