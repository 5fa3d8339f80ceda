"""Sequence packing: native == twin, packing invariants, fill ratio, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpctrain.native import fill_ratio, pack_sequences


def check_invariants(lengths, capacity, bin_offsets, order, truncate=False):
    n = len(lengths)
    assert bin_offsets.dtype == np.int64 and order.dtype == np.int64
    assert bin_offsets[0] == 0 and bin_offsets[-1] == n
    assert np.all(np.diff(bin_offsets) > 0), "no empty bins"
    assert np.array_equal(np.sort(order), np.arange(n)), "every sample placed exactly once"
    eff = np.minimum(np.asarray(lengths, np.int64), capacity)
    loads = np.add.reduceat(eff[order], bin_offsets[:-1]) if n else np.zeros(0)
    assert np.all(loads <= capacity), "no bin over capacity"
    # best fit never leaves two bins that could be merged when both are half-empty or less
    assert np.sum(loads <= capacity // 2) <= 1 if n else True


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 70), max_size=300), st.integers(1, 80), st.booleans(), st.booleans())
def test_native_equals_twin(lengths, capacity, truncate, as_int32):
    arr = np.asarray(lengths, dtype=np.int32 if as_int32 else np.int64)
    if not truncate and len(arr) and arr.max() > capacity:
        for impl in ("native", "python"):
            with pytest.raises(ValueError, match="longer than the capacity"):
                pack_sequences(arr, capacity, impl=impl)
        return
    native = pack_sequences(arr, capacity, truncate=truncate)
    twin = pack_sequences(arr, capacity, truncate=truncate, impl="python")
    assert np.array_equal(native[0], twin[0]) and np.array_equal(native[1], twin[1])
    check_invariants(arr, capacity, *native)


def test_large_random_equal_and_fill():
    rng = np.random.default_rng(7)
    lengths = np.clip(rng.lognormal(5.2, 0.8, size=30_000), 1, 2048).astype(np.int64)
    native = pack_sequences(lengths, 2048)
    twin = pack_sequences(lengths, 2048, impl="python")
    assert np.array_equal(native[0], twin[0]) and np.array_equal(native[1], twin[1])
    check_invariants(lengths, 2048, *native)
    assert fill_ratio(lengths, native[0], 2048) > 0.99


def test_known_small_example():
    # longest first: 8->bin0 (rem 2), 7->bin1 (rem 3), 5->bin2 (rem 5), 3->bin1 (tightest), 2->bin0, 1->bin2
    offsets, order = pack_sequences([5, 3, 7, 2, 8, 1], 10)
    assert offsets.tolist() == [0, 2, 4, 6]
    assert order.tolist() == [4, 3, 2, 1, 0, 5]


def test_truncate_gives_full_bins():
    offsets, order = pack_sequences(np.array([50, 3, 12, 4]), 10, truncate=True)
    bins = [sorted(order[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert [0] in bins and [2] in bins
    check_invariants([50, 3, 12, 4], 10, offsets, order, truncate=True)


def test_empty_and_zero_lengths():
    offsets, order = pack_sequences(np.zeros(0, np.int64), 16)
    assert offsets.tolist() == [0] and order.size == 0
    offsets, order = pack_sequences([0, 0, 16], 16)
    assert offsets.tolist() == [0, 3] and sorted(order.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("impl", ["native", "python"])
def test_bad_input(impl):
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3 is negative"):
        pack_sequences([4, -3], 8, impl=impl)
    with pytest.raises(ValueError, match=r"2 sample\(s\) are longer than the capacity 8 \(longest: lengths\[2\] = 30\)"):
        pack_sequences([4, 9, 30], 8, impl=impl)
    with pytest.raises(ValueError, match="capacity must be > 0"):
        pack_sequences([1], 0, impl=impl)
    with pytest.raises(TypeError, match="int32 or int64"):
        pack_sequences(np.array([1.5, 2.0]), 8, impl=impl)
    with pytest.raises(ValueError, match="C-contiguous"):
        pack_sequences(np.arange(10)[::2], 8, impl=impl)
    with pytest.raises(ValueError, match="1-D"):
        pack_sequences(np.ones((2, 2), np.int64), 8, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        pack_sequences([1], 8, impl="fast")


def test_native_rejects_bad_arrays_directly():
    from hpctrain import _C
    with pytest.raises(TypeError, match="int32 or int64"):
        _C.pack_sequences(np.array([1, 2], np.int16), 8, False)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.pack_sequences(np.arange(6)[::2], 8, False)
    with pytest.raises(ValueError, match="capacity must be in"):
        _C.pack_sequences(np.arange(3), 1 << 30, False)


def test_zero_copy_outputs_outlive_inputs():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    offsets, order = pack_sequences(lengths, 128)
    del lengths
    assert not order.flags.owndata and order.base is not None  # held by the capsule
    assert int(order.sum()) == 999 * 1000 // 2
