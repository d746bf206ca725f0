"""Patch 0004: the CPU pool_2d on several threads, reading its source row by row, gives what the op defines
(ggml's own output size, max or average over the kernel window, padding skipped, the average divided by
k0 * k1) for the attention tap's 1 x n_rows kernel and for general kernels, strides and padding."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvgguf._native import LIB_DIR, _shared_library_name

POOL_MAX, POOL_AVG = 0, 1   # enum ggml_op_pool
GGML_TYPE_F32 = 0


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture(scope="module")
def ggml():
    base = ctypes.CDLL(str(LIB_DIR / _shared_library_name("ggml-base")))
    cpu = ctypes.CDLL(str(LIB_DIR / _shared_library_name("ggml-cpu")))
    p = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [InitParams], p
    base.ggml_free.argtypes, base.ggml_free.restype = [p], None
    base.ggml_new_tensor_3d.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    base.ggml_new_tensor_3d.restype = p
    base.ggml_pool_2d.argtypes = [p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_float, ctypes.c_float]
    base.ggml_pool_2d.restype = p
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [p], p
    base.ggml_nelements.argtypes, base.ggml_nelements.restype = [p], ctypes.c_int64
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [p], p
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [p, p], None
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    return base, cpu


def ggml_pool_2d(ggml, src: np.ndarray, op: int, k0: int, k1: int, s0: int, s1: int, p0: int, p1: int,
                 n_threads: int) -> np.ndarray:
    """Run ggml's pool_2d on the CPU backend; ``src`` is [C, H, W] (ggml's ne = W, H, C)."""
    base, cpu = ggml
    ctx = base.ggml_init(InitParams(64 << 20, None, False))
    assert ctx
    try:
        n_c, n_h, n_w = src.shape
        tensor = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_w, n_h, n_c)
        ctypes.memmove(base.ggml_get_data(tensor), np.ascontiguousarray(src, dtype=np.float32).ctypes.data,
                       src.size * 4)
        out = base.ggml_pool_2d(ctx, tensor, op, k0, k1, s0, s1, float(p0), float(p1))
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        out_h = (n_h + 2 * p1 - k1) // s1 + 1
        out_w = (n_w + 2 * p0 - k0) // s0 + 1
        assert base.ggml_nelements(out) == n_c * out_h * out_w
        data = ctypes.cast(base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, shape=(n_c, out_h, out_w)).copy()
    finally:
        base.ggml_free(ctx)


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
