"""Packed batch index and pretraining sample index: native == twin, consistency, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpctrain.native import packed_batch_index, pt_sample_index

rows_strategy = st.lists(st.lists(st.integers(0, 20), max_size=6), min_size=1, max_size=5)


@settings(max_examples=100, deadline=None)
@given(rows_strategy, st.sampled_from([1, 2, 4, 8, 128]))
def test_batch_index_native_equals_twin(rows, multiple):
    pos, cu = packed_batch_index(rows, pad_to_multiple=multiple)
    pos2, cu2 = packed_batch_index(rows, pad_to_multiple=multiple, impl="python")
    assert np.array_equal(pos, pos2) and np.array_equal(cu, cu2)
    b, s = pos.shape
    assert s % multiple == 0 and s >= max(sum(r) for r in rows)
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == b * s and np.all(np.diff(cu) > 0)
    flat = pos.reshape(-1)
    # positions restart at 0 exactly at segment starts and count up by one inside segments
    starts = np.zeros(b * s, bool)
    starts[cu[:-1]] = True
    assert np.array_equal(flat == 0, starts)
    seg_len = np.diff(cu)
    assert np.array_equal(flat[cu[1:] - 1], seg_len - 1)
    # segments never cross rows; the samples come first, in order
    assert np.all(np.isin(np.arange(0, b * s + 1, s), cu))
    expect = []
    for r, row in enumerate(rows):
        expect += [n for n in row if n] + ([s - sum(row)] if s > sum(row) else [])
    assert seg_len.tolist() == expect


def test_batch_index_csr_form_and_explicit_seq_len():
    lengths, offsets = np.array([3, 2, 4], np.int64), np.array([0, 2, 3], np.int64)
    pos, cu = packed_batch_index((lengths, offsets), 8)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert cu.tolist() == [0, 3, 5, 8, 12, 16]
    pos, cu = packed_batch_index([[4, 4]], 8)
    assert cu.tolist() == [0, 4, 8]  # a full row has no padding segment


@pytest.mark.parametrize("impl", ["native", "python"])
def test_batch_index_bad_input(impl):
    with pytest.raises(ValueError, match="row 0 holds 9 tokens, more than seq_len = 8"):
        packed_batch_index([[5, 4]], 8, impl=impl)
    with pytest.raises(ValueError, match="negative"):
        packed_batch_index([[5, -1]], 8, impl=impl)
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple"):
        packed_batch_index([[5]], 6, pad_to_multiple=4, impl=impl)
    with pytest.raises(TypeError, match="integer"):
        packed_batch_index([[1.5]], 8, impl=impl)
    with pytest.raises(ValueError, match="C-contiguous"):
        packed_batch_index((np.arange(8)[::2], np.array([0, 4])), 64, impl=impl)


def test_batch_index_native_checks_offsets():
    from hpctrain import _C
    with pytest.raises(ValueError, match="row_offsets must start at 0"):
        _C.packed_batch_index(np.array([1, 2]), np.array([0, 1]), 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        _C.packed_batch_index(np.array([1, 2]), np.array([0, 3, 2]), 8)


def reference_windows(doc_lengths, order, seq_length):
    """Brute force over an explicit token stream: token = (doc position k, offset)."""
    stream = [(k, j) for k, d in enumerate(order) for j in range(doc_lengths[d])]
    n = (len(stream) - 1) // seq_length if stream else 0
    out = []
    for i in range(n):
        w = stream[i * seq_length:i * seq_length + seq_length + 1]
        out.append((w[0], [p for p in range(1, len(w)) if w[p][0] != w[p - 1][0]]))
    return out, (stream[n * seq_length] if stream else (0, 0))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=25), st.integers(1, 12), st.booleans(), st.randoms())
def test_pt_index_native_equals_twin_and_reference(lengths, seq_length, shuffle, rnd):
    lengths = np.asarray(lengths, np.int64)
    order = np.arange(len(lengths), dtype=np.int64)
    if shuffle and len(order):
        order = np.asarray([rnd.randrange(len(lengths)) for _ in range(2 * len(lengths))], np.int64)
    native = pt_sample_index(lengths, seq_length, doc_order=order)
    twin = pt_sample_index(lengths, seq_length, doc_order=order, impl="python")
    for a, b in zip(native, twin):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    sample_idx, boff, bounds = native
    windows, last = reference_windows(lengths, order, seq_length)
    assert len(sample_idx) == len(windows) + 1 == len(boff)
    for i, (first, cuts) in enumerate(windows):
        assert tuple(sample_idx[i]) == first
        assert bounds[boff[i]:boff[i + 1]].tolist() == cuts
    if windows:
        assert tuple(sample_idx[-1]) == last


def test_pt_index_known_example_and_num_samples():
    sample_idx, boff, bounds = pt_sample_index(np.array([5, 0, 7, 4]), 4)
    assert sample_idx.tolist() == [[0, 0], [0, 4], [2, 3], [3, 0]]
    assert boff.tolist() == [0, 0, 1, 2] and bounds.tolist() == [1, 4]
    sample_idx, boff, _ = pt_sample_index(np.array([5, 0, 7, 4]), 4, num_samples=1)
    assert sample_idx.shape == (2, 2) and boff.tolist() == [0, 0]


def test_pt_index_offsets_beyond_int32():
    # 3 documents of 1.5 billion tokens: offsets must be int64
    lengths = np.array([1_500_000_000] * 3, np.int64)
    sample_idx, boff, bounds = pt_sample_index(lengths, 1_000_000_000)
    assert sample_idx.dtype == np.int64 and sample_idx[-1].tolist() == [2, 1_000_000_000]
    assert bounds.tolist() == [500_000_000, 1_000_000_000] and boff.tolist() == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("impl", ["native", "python"])
def test_pt_index_bad_input(impl):
    with pytest.raises(ValueError, match="negative|>= 0"):
        pt_sample_index([4, -1], 2, impl=impl)
    with pytest.raises(ValueError, match="doc_order"):
        pt_sample_index([4, 4], 2, doc_order=[0, 2], impl=impl)
    with pytest.raises(ValueError, match="num_samples = 9"):
        pt_sample_index([4, 4], 2, num_samples=9, impl=impl)
    with pytest.raises(ValueError, match="seq_length"):
        pt_sample_index([4, 4], 0, impl=impl)
    with pytest.raises(TypeError, match="int32 or int64"):
        pt_sample_index(np.array([4.0]), 2, impl=impl)
