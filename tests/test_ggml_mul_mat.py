"""Patches 0005 and 0006: ggml's CPU mul_mat through tinyBLAS (llamafile sgemm) gives A·Bᵀ for f32, f16 and bf16
weights. 0005: tinyBLAS's accumulators reduced four at a time in registers; attention's q·kᵀ shape (k = a head dim
of 64, n = a ubatch of queries), every tile tail of n and m, other k (and shapes tinyBLAS leaves to ggml's own
kernel), 1 and 3 threads. 0006: the short-k kernel for f16 A (vectorized over A's rows, A transposed per job), with
B as given (f32) or converted to f16 first (a strided B, as attention's permuted q), over its job, column-block
and register-tile tails, and the k beyond it."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ggmltest import GGML, GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32

# m (rows of A: multiple of 16, of 8, of 4, none), n (columns of B: tile tails of 6), k (multiple of 16, 8)
SHAPES = [(m, n, k) for m in (64, 40, 36, 130) for n in (2, 5, 6, 7, 13, 128) for k in (64, 16, 8, 576)]
# the short-k kernel: m (multiples of its 16- and 64-row register tiles, one and several 64-row jobs), n (from its
# minimum of 16, tails of its 6-column tiles and 48-column blocks), k (multiples of 8 and 16 up to its 128, then
# beyond, where tinyBLAS takes it)
SHORT_K_SHAPES = [(m, n, k) for m in (16, 48, 64, 192, 1024) for n in (16, 17, 47, 48, 49, 100, 128)
                  for k in (16, 24, 64, 128, 144)]


@pytest.fixture(scope="module")
def ggml() -> GGML:
    lib = GGML()
    lib.mul_mat = lib.declare("ggml_mul_mat", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
    lib.view_2d = lib.declare("ggml_view_2d", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                               ctypes.c_size_t, ctypes.c_size_t])
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


def mul_mat(ggml: GGML, a_raw: np.ndarray, a_type: int, b: np.ndarray, n_threads: int,
            strided_b: bool = False) -> np.ndarray:
    """ggml_mul_mat(A [m, k], B [n, k] f32) on the CPU: [n, m], C[j, i] = sum_l A[i, l] B[j, l]. ``strided_b``: B
    is a view with padded rows, which ggml converts to A's dot type before tinyBLAS sees it."""
    (m, k), n = a_raw.shape, b.shape[0]
    with ggml.context(a_raw.nbytes + 4 * b.nbytes + 4 * m * n + (1 << 20)) as ctx:
        if strided_b:
            padded = ggml.tensor(ctx, GGML_TYPE_F32, np.pad(b, ((0, 0), (0, 8))))
            b_tensor = ggml.view_2d(ctx, padded, k, n, (k + 8) * 4, 0)
        else:
            b_tensor = ggml.tensor(ctx, GGML_TYPE_F32, b)
        out = ggml.mul_mat(ctx, ggml.tensor(ctx, a_type, a_raw), b_tensor)
        return ggml.compute(ctx, out, n_threads, (n, m))


def worst_error(ggml: GGML, rng: np.random.Generator, a_type: int, shape: tuple[int, int, int], n_threads: int,
                strided_b: bool = False) -> float:
    """The largest error of ggml's A·Bᵀ for random A and B of ``shape`` (m, n, k), in units of its bound."""
    m, n, k = shape
    a_raw, a = as_type(rng.standard_normal((m, k)), a_type)
    # B exactly representable in A's dot type (ggml converts it to that type first): the reference is exact
    _, b = as_type(rng.standard_normal((n, k)), a_type)
    got = mul_mat(ggml, a_raw, a_type, b.astype(np.float32), n_threads, strided_b)
    want = b @ a.T
    # f32 accumulation of k products: well inside 1e-5 of the sum of their magnitudes
    bound = 1e-5 * (np.abs(b) @ np.abs(a).T) + 1e-30
    return float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("a_type", [GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_BF16], ids=["f16", "f32", "bf16"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_mul_mat_is_a_times_b_transposed(ggml, a_type, n_threads):
    rng = np.random.default_rng(a_type + 10 * n_threads)
    for shape in SHAPES:
        worst = worst_error(ggml, rng, a_type, shape, n_threads)
        assert worst <= 1.0, f"m, n, k = {shape}: error {worst:.2f} x the bound"


@pytest.mark.parametrize("strided_b", [False, True], ids=["b-f32", "b-converted-to-f16"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_short_k_mul_mat_is_a_times_b_transposed(ggml, strided_b, n_threads):
    """A row or column out of place in the transposition, a tile or block tail skipped or written twice: the
    outputs would differ from the reference far beyond the bound (the inputs are random)."""
    rng = np.random.default_rng(100 + 10 * n_threads + strided_b)
    for shape in SHORT_K_SHAPES:
        worst = worst_error(ggml, rng, GGML_TYPE_F16, shape, n_threads, strided_b)
        assert worst <= 1.0, f"m, n, k = {shape}: error {worst:.2f} x the bound"


def test_mul_mat_does_not_depend_on_the_thread_count(ggml):
    """Each output is one tile's sum, whichever thread computes it: the same bits on 1, 2 and 3 threads (the
    short-k kernel with B as given and converted, and tinyBLAS for a longer k)."""
    rng = np.random.default_rng(7)
    for k, strided_b in ((64, False), (64, True), (576, False)):
        a_raw, _ = as_type(rng.standard_normal((1024, k)), GGML_TYPE_F16)
        b = rng.standard_normal((128, k)).astype(np.float32)
        results = [mul_mat(ggml, a_raw, GGML_TYPE_F16, b, n_threads, strided_b) for n_threads in (1, 2, 3)]
        for other in results[1:]:
            assert np.array_equal(results[0].view(np.uint32), other.view(np.uint32))
