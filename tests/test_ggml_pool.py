"""Patch 0004: the CPU pool_2d on several threads, reading its source row by row, gives what the op defines
(ggml's own output size, max or average over the kernel window, padding skipped, the average divided by
k0 * k1) for the attention tap's 1 x n_rows kernel and for general kernels, strides and padding."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ggmltest import GGML, GGML_TYPE_F32

POOL_MAX, POOL_AVG = 0, 1   # enum ggml_op_pool


@pytest.fixture(scope="module")
def ggml() -> GGML:
    lib = GGML()
    lib.pool_2d = lib.declare("ggml_pool_2d", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                               ctypes.c_float])
    return lib


def ggml_pool_2d(ggml: GGML, src: np.ndarray, op: int, k0: int, k1: int, s0: int, s1: int, p0: int, p1: int,
                 n_threads: int) -> np.ndarray:
    """Run ggml's pool_2d on the CPU backend; ``src`` is [C, H, W] (ggml's ne = W, H, C)."""
    n_c, n_h, n_w = src.shape
    out_h = (n_h + 2 * p1 - k1) // s1 + 1
    out_w = (n_w + 2 * p0 - k0) // s0 + 1
    with ggml.context(64 << 20) as ctx:
        tensor = ggml.tensor(ctx, GGML_TYPE_F32, src.astype(np.float32))
        out = ggml.pool_2d(ctx, tensor, op, k0, k1, s0, s1, float(p0), float(p1))
        return ggml.compute(ctx, out, n_threads, (n_c, out_h, out_w))


def reference_pool_2d(src: np.ndarray, op: int, k0: int, k1: int, s0: int, s1: int, p0: int, p1: int) -> np.ndarray:
    n_c, n_h, n_w = src.shape
    out_h, out_w = (n_h + 2 * p1 - k1) // s1 + 1, (n_w + 2 * p0 - k0) // s0 + 1
    out = np.empty((n_c, out_h, out_w), dtype=np.float32)
    for oy in range(out_h):
        for ox in range(out_w):
            y0, x0 = oy * s1 - p1, ox * s0 - p0
            window = src[:, max(0, y0):max(0, y0 + k1), max(0, x0):max(0, x0 + k0)].reshape(n_c, -1)
            if op == POOL_MAX:
                out[:, oy, ox] = window.max(axis=1) if window.shape[1] else -np.finfo(np.float32).max
            else:
                out[:, oy, ox] = window.sum(axis=1) / (k0 * k1)
    return out


@pytest.mark.parametrize("op", [POOL_MAX, POOL_AVG], ids=["max", "avg"])
@pytest.mark.parametrize("kernel", [
    (1, 300, 1, 300, 0, 0),   # the tap: all rows of [n_kv, n_rows, n_head] at once
    (3, 2, 2, 1, 1, 0),
    (2, 3, 1, 2, 0, 1),
    (4, 4, 4, 4, 0, 0),
], ids=["tap", "3x2-s2x1-p1x0", "2x3-s1x2-p0x1", "4x4"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_pool_2d_matches_its_definition(ggml, op, kernel, n_threads):
    rng = np.random.default_rng(sum(kernel) + op)
    n_h = kernel[1] if kernel[1] == 300 else 17
    src = rng.standard_normal((5, n_h, 600)).astype(np.float32)   # 600 > one 256-output block per row
    got = ggml_pool_2d(ggml, src, op, *kernel, n_threads=n_threads)
    np.testing.assert_allclose(got, reference_pool_2d(src, op, *kernel), rtol=1e-5, atol=1e-5)
