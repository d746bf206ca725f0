"""libkvgguf's score post-processing against NumPy references, and its error codes."""
from __future__ import annotations

import numpy as np
import pytest

from kvgguf._native import NativeError
from kvgguf.scores import lazy_observe, maxpool1d, reduce_groups, select_topk


def test_maxpool_matches_numpy_reference():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((6, 101)).astype(np.float32)
    for kernel in (1, 3, 7):
        half = kernel // 2
        padded = np.pad(scores, ((0, 0), (half, half)), constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=1)
        assert np.array_equal(maxpool1d(scores, kernel), windows.max(axis=2))
    with pytest.raises(NativeError, match="odd"):
        maxpool1d(scores, 4)


def test_reduce_groups_matches_numpy():
    rng = np.random.default_rng(1)
    scores = rng.random((30 * 3, 50)).astype(np.float32)
    assert np.array_equal(reduce_groups(scores, 3, "max"), scores.reshape(30, 3, 50).max(axis=1))
    np.testing.assert_allclose(reduce_groups(scores, 90, "mean")[0], scores.mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        reduce_groups(scores, 7)
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_groups(scores, 3, "median")


def test_select_topk_keeps_protected_then_best():
    scores = np.array([[5, 1, 9, 3, 7, 2, 8, 0]], dtype=np.float32)
    protect = np.array([1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    keep = select_topk(scores, 5, protect)
    assert keep.tolist() == [[0, 1, 2, 6, 7]]          # protected 0, 1, 7 + the two best of the rest (9, 8)
    ties = select_topk(np.array([1, 1, 1, 1], dtype=np.float32), 2)
    assert ties.tolist() == [0, 1]                      # ties: lower index wins
    nan = select_topk(np.array([np.nan, 0.5, 0.1], dtype=np.float32), 1)
    assert nan.tolist() == [1]                          # NaN ranks lowest
    rng = np.random.default_rng(2)
    many = rng.random((4, 3, 200)).astype(np.float32)
    keep = select_topk(many, 20)
    assert keep.shape == (4, 3, 20)
    assert np.array_equal(keep, np.sort(np.argsort(-many, axis=-1)[..., :20], axis=-1))
    with pytest.raises(NativeError, match="budget"):
        select_topk(scores, 2, protect)                 # three protected cells do not fit in two
    with pytest.raises(NativeError, match="budget"):
        select_topk(scores, 9)


def test_lazy_observe_matches_numpy_on_views_of_a_growing_buffer():
    """LazyEviction's update in place on the first cells of wider buffers (how CellState grows), against the
    NumPy definition: where attention >= alpha, MRI = max(MRI, step - TS) and TS = step."""
    rng = np.random.default_rng(2)
    n_layer, n_head_kv, n, capacity, alpha = 4, 3, 50, 64, 0.02
    seen_buffer = rng.integers(0, 100, (n_layer, n_head_kv, capacity), dtype=np.int32)
    recurrence_buffer = rng.integers(0, 30, (n_layer, n_head_kv, capacity), dtype=np.int32)
    last_seen, recurrence = seen_buffer[..., :n], recurrence_buffer[..., :n]
    expected_seen, expected_recurrence = last_seen.copy(), recurrence.copy()
    for step in range(100, 140):
        attention = (rng.random((n_layer, n_head_kv, n + 1)) * 0.04).astype(np.float32)[..., :n]
        attended = attention >= np.float32(alpha)
        expected_recurrence = np.where(attended, np.maximum(expected_recurrence, step - expected_seen),
                                       expected_recurrence)
        expected_seen = np.where(attended, step, expected_seen)
        lazy_observe(attention, last_seen, recurrence, step, alpha)
        assert np.array_equal(last_seen, expected_seen) and np.array_equal(recurrence, expected_recurrence)
    assert (seen_buffer[..., n:] < 100).all()  # the room past the cells is not touched


def test_lazy_observe_refuses_mismatched_arrays():
    attention = np.zeros((2, 3, 8), dtype=np.float32)
    state = np.zeros((2, 3, 8), dtype=np.int32)
    with pytest.raises(ValueError, match="shapes differ"):
        lazy_observe(attention[..., :7], state, state.copy(), 1, 0.1)
    with pytest.raises(ValueError, match="int32"):
        lazy_observe(attention, state.astype(np.int64), state.copy(), 1, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        lazy_observe(attention[..., ::2], state[..., ::2], state.copy()[..., ::2], 1, 0.1)
    with pytest.raises(ValueError, match="same layout"):
        lazy_observe(attention[..., :4], state[..., :4], np.zeros((2, 3, 4), dtype=np.int32), 1, 0.1)
