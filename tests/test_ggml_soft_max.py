"""Patch 0007: ggml_vec_max_f32 in vectors. soft_max_ext, which takes each row's maximum with it, still gives
softmax(x * scale + mask) for row lengths around every vector and unroll width (the maximum in the vector part or
in the scalar tail), masked cells (-inf) and rows whose maximum is a single cell, on 1 and 3 threads."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ggmltest import GGML, GGML_TYPE_F32

ROW_LENGTHS = [1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 2048, 2051]
SCALE = 0.125


@pytest.fixture(scope="module")
def ggml() -> GGML:
    lib = GGML()
    lib.soft_max_ext = lib.declare("ggml_soft_max_ext", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                         ctypes.c_float, ctypes.c_float])
    return lib


def soft_max(ggml: GGML, x: np.ndarray, mask: np.ndarray, n_threads: int) -> np.ndarray:
    """ggml_soft_max_ext(x [heads, rows, n], mask [rows, n], SCALE, max_bias 0) on the CPU."""
    with ggml.context(3 * x.nbytes + mask.nbytes + (1 << 20)) as ctx:
        out = ggml.soft_max_ext(ctx, ggml.tensor(ctx, GGML_TYPE_F32, x), ggml.tensor(ctx, GGML_TYPE_F32, mask),
                                SCALE, 0.0)
        return ggml.compute(ctx, out, n_threads, x.shape)


def reference(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) * SCALE + mask.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("n_threads", [1, 3])
def test_soft_max_takes_each_rows_maximum(ggml, n_threads):
    rng = np.random.default_rng(n_threads)
    for n in ROW_LENGTHS:
        n_rows = 6
        x = rng.standard_normal((2, n_rows, n)).astype(np.float32) * 8
        mask = np.zeros((n_rows, n), dtype=np.float32)
        mask[1, 1::3] = -np.inf                    # masked cells, the rest of the row as usual
        mask[2, :-1] = -np.inf                     # only the last cell (the scalar tail) is visible
        mask[3, 1:] = -np.inf                      # only the first
        x[:, 4, n // 2] = 1000.0                   # one cell far above the others, in the middle of the row
        x[:, 5, -1] = 1000.0                       # ... at its end
        got = soft_max(ggml, x, mask, n_threads)
        want = reference(x, mask)
        # exp of the difference to the row's maximum: a wrong maximum overflows to inf or shifts every weight
        assert np.all(np.isfinite(got)), f"n={n}"
        assert np.allclose(got, want, rtol=1e-5, atol=1e-7), f"n={n}: worst {np.max(np.abs(got - want)):.3g}"
        assert np.allclose(got.sum(axis=-1), 1.0, atol=1e-5), f"n={n}"
