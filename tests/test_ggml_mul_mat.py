"""Patch 0005: ggml's CPU mul_mat through tinyBLAS (llamafile sgemm), its accumulators reduced four at a time in
registers, gives A·Bᵀ for f32, f16 and bf16 weights: attention's q·kᵀ shape (k = a head dim of 64, n = a ubatch of
queries), every tile tail of n and m, other k (and shapes tinyBLAS leaves to ggml's own kernel), 1 and 3 threads."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ggmltest import GGML, GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32

# m (rows of A: multiple of 16, of 8, of 4, none), n (columns of B: tile tails of 6), k (multiple of 16, 8)
SHAPES = [(m, n, k) for m in (64, 40, 36, 130) for n in (2, 5, 6, 7, 13, 128) for k in (64, 16, 8, 576)]


@pytest.fixture(scope="module")
def ggml() -> GGML:
    lib = GGML()
    lib.mul_mat = lib.declare("ggml_mul_mat", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
    return lib


def as_type(values: np.ndarray, ggml_type: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` rounded to ``ggml_type`` (bf16: to nearest even): (the raw elements, their float64 values)."""
    if ggml_type == GGML_TYPE_F32:
        raw = values.astype(np.float32)
        return raw, raw.astype(np.float64)
    if ggml_type == GGML_TYPE_F16:
        raw = values.astype(np.float16)
        return raw, raw.astype(np.float64)
    bits = values.astype(np.float32).view(np.uint32)
    raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return raw, (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def mul_mat(ggml: GGML, a_raw: np.ndarray, a_type: int, b: np.ndarray, n_threads: int) -> np.ndarray:
    """ggml_mul_mat(A [m, k], B [n, k] f32) on the CPU: [n, m], C[j, i] = sum_l A[i, l] B[j, l]."""
    (m, k), n = a_raw.shape, b.shape[0]
    with ggml.context(a_raw.nbytes + 3 * b.nbytes + 4 * m * n + (1 << 20)) as ctx:
        out = ggml.mul_mat(ctx, ggml.tensor(ctx, a_type, a_raw), ggml.tensor(ctx, GGML_TYPE_F32, b))
        return ggml.compute(ctx, out, n_threads, (n, m))


@pytest.mark.parametrize("a_type", [GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_BF16], ids=["f16", "f32", "bf16"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_mul_mat_is_a_times_b_transposed(ggml, a_type, n_threads):
    rng = np.random.default_rng(a_type + 10 * n_threads)
    for m, n, k in SHAPES:
        a_raw, a = as_type(rng.standard_normal((m, k)), a_type)
        # B exactly representable in A's dot type (ggml converts it to that type first): the reference is exact
        _, b = as_type(rng.standard_normal((n, k)), a_type)
        got = mul_mat(ggml, a_raw, a_type, b.astype(np.float32), n_threads)
        want = b @ a.T
        # f32 accumulation of k products: well inside 1e-5 of the sum of their magnitudes
        bound = 1e-5 * (np.abs(b) @ np.abs(a).T) + 1e-30
        worst = float(np.max(np.abs(got - want) / bound))
        assert worst <= 1.0, f"m={m} n={n} k={k}: error {worst:.2f} x the bound"


def test_mul_mat_does_not_depend_on_the_thread_count(ggml):
    """Each output is one tile's sum, whichever thread computes it: the same bits on 1, 2 and 3 threads."""
    rng = np.random.default_rng(7)
    a_raw, _ = as_type(rng.standard_normal((1024, 64)), GGML_TYPE_F16)
    b = rng.standard_normal((128, 64)).astype(np.float32)
    results = [mul_mat(ggml, a_raw, GGML_TYPE_F16, b, n_threads) for n_threads in (1, 2, 3)]
    for other in results[1:]:
        assert np.array_equal(results[0].view(np.uint32), other.view(np.uint32))
