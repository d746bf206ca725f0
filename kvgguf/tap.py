"""The attention tap (patches/0003): per-(layer, KV head, cell) attention received from observer queries."""
from __future__ import annotations

import ctypes

import numpy as np
import numpy.typing as npt

from ._native import KVGGUF_REDUCE, AttnTapParams, check_kv, libllama

_float_p = ctypes.POINTER(ctypes.c_float)


class AttentionTap:
    """Start, read and stop the tap of one llama.cpp context.

    While it runs, every decode adds the attention that the observer queries (tokens of ``seq_id`` with
    positions in ``[p0, p1)``) pay to each cell, reduced over those queries by ``reduce_rows``; reading reduces
    the query heads of each KV group by ``reduce_heads``. Read before evicting: scores follow cell indices.
    """

    def __init__(self, ctx: ctypes.c_void_p, n_layer: int, n_head_kv: int) -> None:
        self.ctx = ctx
        self.n_layer = n_layer
        self.n_head_kv = n_head_kv
        self._scratch = np.empty(0, dtype=np.float32)  # scores(scratch=True) reads into it

    def start(self, seq_id: int, p0: int, p1: int, reduce_rows: str = "mean", reduce_heads: str = "mean") -> None:
        for name, value in (("reduce_rows", reduce_rows), ("reduce_heads", reduce_heads)):
            if value not in KVGGUF_REDUCE:
                raise ValueError(f"{name} must be one of {sorted(KVGGUF_REDUCE)}, got {value!r}")
        params = AttnTapParams(seq_id, p0, p1, KVGGUF_REDUCE[reduce_rows], KVGGUF_REDUCE[reduce_heads])
        check_kv(libllama.llama_attn_tap_set(self.ctx, ctypes.byref(params)), "attn_tap_set")

    def stop(self) -> None:
        check_kv(libllama.llama_attn_tap_set(self.ctx, None), "attn_tap_set")

    def n_rows(self) -> int:
        return libllama.llama_attn_tap_n_rows(self.ctx)

    def scores(self, seq_id: int, tier: int | None = None, scratch: bool = False) -> npt.NDArray[np.float32]:
        """[n_layer, n_head_kv, n_cells] for the cells of ``seq_id`` in ascending position order; with a tiered
        cache, the cells of one tier (zeros for the heads of other tiers). ``scratch``: in memory of the tap's
        own that the next scratch read overwrites (a decode step's scores, read at every step without new
        memory)."""
        if tier is None:
            def read(out, n: int) -> int:
                return libllama.llama_attn_tap_get(self.ctx, seq_id, out, n)
        else:
            def read(out, n: int) -> int:
                return libllama.llama_attn_tap_get_tier(self.ctx, tier, seq_id, out, n)
        if scratch:
            rows = self.n_layer * self.n_head_kv
            room = self._scratch.size // rows
            n = check_kv(read(self._scratch.ctypes.data_as(_float_p) if room else None, room), "attn_tap_get")
            if n > room:  # grown past the room: a quarter more, so that growing one cell a step rarely reallocates
                self._scratch = np.empty(rows * (n + max(64, n // 4)), dtype=np.float32)
                n = check_kv(read(self._scratch.ctypes.data_as(_float_p), n), "attn_tap_get")
            return self._scratch[:rows * n].reshape(self.n_layer, self.n_head_kv, n)
        n = check_kv(read(None, 0), "attn_tap_get")
        out = np.empty((self.n_layer, self.n_head_kv, n), dtype=np.float32)  # every entry is written
        if n:
            check_kv(read(out.ctypes.data_as(_float_p), n), "attn_tap_get")
        return out
