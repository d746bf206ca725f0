"""Test helpers: single ggml ops on the CPU backend of kvgguf's build (libggml-base + libggml-cpu), through ctypes,
for the patches that change CPU kernels (0004 pool_2d, 0005 tinyBLAS)."""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from kvgguf._native import LIB_DIR, _shared_library_name

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30
_p = ctypes.c_void_p


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class GGML:
    """ggml's graph API (libggml-base) and the CPU backend's compute (libggml-cpu) of kvgguf's build."""

    def __init__(self) -> None:
        self.base = base = ctypes.CDLL(str(LIB_DIR / _shared_library_name("ggml-base")))
        self.cpu = cpu = ctypes.CDLL(str(LIB_DIR / _shared_library_name("ggml-cpu")))
        i64 = ctypes.c_int64
        base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], _p
        base.ggml_free.argtypes, base.ggml_free.restype = [_p], None
        base.ggml_new_tensor_2d.argtypes, base.ggml_new_tensor_2d.restype = [_p, ctypes.c_int, i64, i64], _p
        base.ggml_new_tensor_3d.argtypes, base.ggml_new_tensor_3d.restype = [_p, ctypes.c_int, i64, i64, i64], _p
        base.ggml_get_data.argtypes, base.ggml_get_data.restype = [_p], _p
        base.ggml_nbytes.argtypes, base.ggml_nbytes.restype = [_p], ctypes.c_size_t
        base.ggml_nelements.argtypes, base.ggml_nelements.restype = [_p], i64
        base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [_p], _p
        base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [_p, _p], None
        cpu.ggml_graph_compute_with_ctx.argtypes = [_p, _p, ctypes.c_int]
        cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int

    @contextmanager
    def context(self, mem_size: int) -> Iterator[int]:
        """A ggml context of ``mem_size`` bytes (tensors and graph), freed afterwards."""
        ctx = self.base.ggml_init(_InitParams(mem_size, None, False))
        assert ctx, f"ggml_init({mem_size}) failed"
        try:
            yield ctx
        finally:
            self.base.ggml_free(ctx)

    def tensor(self, ctx: int, ggml_type: int, data: np.ndarray) -> int:
        """A tensor holding ``data`` (2 or 3 dimensions, C order: ggml's ne is the reversed shape); ``data`` must
        already have the type's element size (float32, or float16 / uint16 bits for the 16-bit types)."""
        shape = data.shape[::-1]
        if len(shape) == 2:
            tensor = self.base.ggml_new_tensor_2d(ctx, ggml_type, *shape)
        else:
            tensor = self.base.ggml_new_tensor_3d(ctx, ggml_type, *shape)
        raw = np.ascontiguousarray(data)
        assert raw.nbytes == self.base.ggml_nbytes(tensor), "element size does not match the ggml type"
        ctypes.memmove(self.base.ggml_get_data(tensor), raw.ctypes.data, raw.nbytes)
        return tensor

    def compute(self, ctx: int, out: int, n_threads: int, shape: tuple[int, ...]) -> np.ndarray:
        """Compute the graph of ``out`` (an f32 tensor) on the CPU with ``n_threads`` and return it as ``shape``."""
        graph = self.base.ggml_new_graph(ctx)
        self.base.ggml_build_forward_expand(graph, out)
        assert self.cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        assert self.base.ggml_nelements(out) == int(np.prod(shape))
        data = ctypes.cast(self.base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, shape=shape).copy()

    def declare(self, name: str, argtypes: list, restype=_p) -> Callable:
        """An op constructor of libggml-base (e.g. ggml_mul_mat) with its ctypes signature."""
        function = getattr(self.base, name)
        function.argtypes, function.restype = argtypes, restype
        return function
