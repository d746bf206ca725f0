"""NumPy front-end of libkvgguf's score post-processing (native/include/kvgguf.h)."""
from __future__ import annotations

import ctypes

import numpy as np
import numpy.typing as npt

from ._native import KVGGUF_REDUCE, check_kvgguf, libkvgguf

FloatArray = npt.NDArray[np.float32]

_float_p = ctypes.POINTER(ctypes.c_float)


def _as_rows(scores: npt.ArrayLike) -> FloatArray:
    array = np.ascontiguousarray(scores, dtype=np.float32)
    return array.reshape(1, -1) if array.ndim == 1 else array.reshape(-1, array.shape[-1])


def maxpool1d(scores: npt.ArrayLike, kernel: int) -> FloatArray:
    """Max-pool along the last axis with an odd ``kernel`` ("same" size, window clipped at the ends)."""
    rows = _as_rows(scores)
    out = np.empty_like(rows)
    check_kvgguf(
        libkvgguf.kvgguf_maxpool1d(rows.ctypes.data_as(_float_p), out.ctypes.data_as(_float_p),
                                   rows.shape[0], rows.shape[1], int(kernel)),
        f"maxpool1d(kernel={kernel})",
    )
    return out.reshape(np.shape(scores))


def reduce_groups(scores: npt.ArrayLike, group: int, op: str = "max") -> FloatArray:
    """Reduce every ``group`` consecutive rows of a 2-D array by ``op`` ("max" or "mean")."""
    if op not in KVGGUF_REDUCE:
        raise ValueError(f"unknown reduction {op!r}; expected one of {sorted(KVGGUF_REDUCE)}")
    rows = _as_rows(scores)
    if group < 1 or rows.shape[0] % group:
        raise ValueError(f"group={group} does not divide the {rows.shape[0]} rows")
    out = np.empty((rows.shape[0] // group, rows.shape[1]), dtype=np.float32)
    check_kvgguf(
        libkvgguf.kvgguf_reduce_rows(rows.ctypes.data_as(_float_p), out.ctypes.data_as(_float_p),
                                     out.shape[0], group, rows.shape[1], KVGGUF_REDUCE[op]),
        f"reduce_groups(group={group}, op={op})",
    )
    return out


def select_topk(scores: npt.ArrayLike, k: int, protect: npt.ArrayLike | None = None) -> npt.NDArray[np.int32]:
    """Per row of ``scores``, the ascending indices of the ``k`` cells kept: all protected cells, then the best.

    ``protect`` is a boolean mask over the last axis shared by all rows. Returns an array of shape
    ``scores.shape[:-1] + (k,)``.
    """
    rows = _as_rows(scores)
    mask = None
    if protect is not None:
        mask = np.ascontiguousarray(protect, dtype=np.uint8)
        if mask.shape != (rows.shape[1],):
            raise ValueError(f"protect has shape {mask.shape}, expected ({rows.shape[1]},)")
    keep = np.empty((rows.shape[0], k), dtype=np.int32)
    check_kvgguf(
        libkvgguf.kvgguf_select_topk(
            rows.ctypes.data_as(_float_p),
            None if mask is None else mask.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
            rows.shape[0], rows.shape[1], int(k), keep.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
        ),
        f"select_topk(k={k}, n={rows.shape[1]})",
    )
    return keep.reshape(np.shape(scores)[:-1] + (k,))


def _row_stride(array: npt.NDArray, dtype: type) -> int:
    """Elements between the rows of ``array`` ([..., n]), whose rows must be equally spaced with contiguous
    cells (a C-contiguous array, or the first n cells of every row of one)."""
    if array.dtype != dtype:
        raise ValueError(f"expected {np.dtype(dtype).name}, got {array.dtype.name}")
    item = array.itemsize
    if array.ndim == 0 or (array.shape[-1] > 1 and array.strides[-1] != item):
        raise ValueError("the cells of each row must be contiguous")
    if array.ndim == 1:
        return array.shape[-1]
    stride = array.strides[-2] // item
    for axis in range(array.ndim - 2):
        if array.shape[axis] > 1 and array.strides[axis] != array.strides[axis + 1] * array.shape[axis + 1]:
            raise ValueError("the rows must be equally spaced")
    return stride


def lazy_observe(attention: FloatArray, last_seen: npt.NDArray[np.int32], recurrence: npt.NDArray[np.int32],
                 step: int, alpha: float) -> None:
    """LazyEviction's update for the token decoded at ``step``, in place: where ``attention`` >= ``alpha``, the
    recurrence interval becomes max(MRI, step - TS) and the last-seen step TS becomes ``step``. All three arrays
    have the same shape ([..., n_cells]); the state may be a view of the first cells of a larger buffer."""
    if not (attention.shape == last_seen.shape == recurrence.shape):
        raise ValueError(f"shapes differ: attention {attention.shape}, last_seen {last_seen.shape}, "
                         f"recurrence {recurrence.shape}")
    n_cells = attention.shape[-1] if attention.ndim else 0
    if attention.size == 0:
        return
    state_stride = _row_stride(last_seen, np.int32)
    if _row_stride(recurrence, np.int32) != state_stride:
        raise ValueError("last_seen and recurrence must have the same layout")
    int_p = ctypes.POINTER(ctypes.c_int32)
    check_kvgguf(
        libkvgguf.kvgguf_lazy_observe(
            attention.ctypes.data_as(_float_p), _row_stride(attention, np.float32),
            last_seen.ctypes.data_as(int_p), recurrence.ctypes.data_as(int_p), state_stride,
            attention.size // n_cells, n_cells, int(step), float(alpha)),
        f"lazy_observe(step={step}, alpha={alpha})",
    )
