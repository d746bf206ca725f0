"""Tiered KV caches: the KV heads of each layer in tiers of different lengths (patches/0012, llama_set_kv_tiers).

A plain llama.cpp cache gives every (layer, KV head) the same number of cells. KVzip's budgets are very unequal
per head (docs/profiles/): a few heads need most of the context, most need little. In a tiered cache each tier
is a KV cache of its own size holding only the heads assigned to it; every token gets a cell in every tier, and
each tier is evicted and compacted on its own, so the heads that keep little can live in a small tier.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._native import KVTierParams, NativeError, check_kv, libllama, llama_cpp_api

MAX_TIERS = 8  # LLAMA_KV_MAX_TIERS


@dataclass(frozen=True)
class KVTierLayout:
    """Which tier holds each (layer, KV head), and how many cells each tier has."""

    n_cells: tuple[int, ...]
    tier_of_head: npt.NDArray[np.int32]  # [n_layer, n_head_kv]

    def __post_init__(self) -> None:
        tier_of_head = np.ascontiguousarray(self.tier_of_head, dtype=np.int32)
        object.__setattr__(self, "tier_of_head", tier_of_head)
        object.__setattr__(self, "n_cells", tuple(int(n) for n in self.n_cells))
        if not 1 <= len(self.n_cells) <= MAX_TIERS:
            raise ValueError(f"a tiered cache has 1 to {MAX_TIERS} tiers, got {len(self.n_cells)}")
        if any(n < 1 for n in self.n_cells):
            raise ValueError(f"every tier needs at least one cell, got n_cells={list(self.n_cells)}")
        if tier_of_head.ndim != 2:
            raise ValueError(f"tier_of_head must have shape [n_layer, n_head_kv], got {tier_of_head.shape}")
        bad = (tier_of_head < 0) | (tier_of_head >= len(self.n_cells))
        if bad.any():
            il, h = np.argwhere(bad)[0]
            raise ValueError(f"tier_of_head[{il}, {h}] = {tier_of_head[il, h]} is not a tier in "
                             f"[0, {len(self.n_cells)})")
        empty = [t for t in range(len(self.n_cells)) if not (tier_of_head == t).any()]
        if empty:
            raise ValueError(f"tiers {empty} hold no KV head")

    @property
    def n_tiers(self) -> int:
        return len(self.n_cells)

    def heads(self, tier: int) -> npt.NDArray[np.int64]:
        """The (layer, KV head) pairs of a tier, [n, 2], in the order of its keep lists (layer, then head)."""
        return np.argwhere(self.tier_of_head == tier)

    def pack(self, tier: int, lists: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """A tier's keep lists, [n_heads_in_tier, n_keep], from lists for every (layer, KV head)
        [n_layer, n_head_kv, n_keep] (the order ``llama_kv_compact_tier`` takes)."""
        lists = np.asarray(lists, dtype=np.int32)
        if lists.shape[:2] != self.tier_of_head.shape:
            raise ValueError(f"lists must have shape [n_layer, n_head_kv, n_keep] = "
                             f"[{self.tier_of_head.shape[0]}, {self.tier_of_head.shape[1]}, n], got {lists.shape}")
        return np.ascontiguousarray(lists[self.tier_of_head == tier])

    def apply(self, ctx: ctypes.c_void_p) -> None:
        """Replace the context's KV cache by an empty cache with these tiers."""
        model = llama_cpp_api.llama_get_model(ctx)
        shape = (llama_cpp_api.llama_model_n_layer(model), llama_cpp_api.llama_model_n_head_kv(model))
        if self.tier_of_head.shape != shape:
            raise ValueError(f"tier_of_head has shape {self.tier_of_head.shape}, the model has [n_layer, n_head_kv] "
                             f"= {list(shape)}")
        n_cells = (ctypes.c_uint32 * self.n_tiers)(*self.n_cells)
        params = KVTierParams(self.n_tiers, n_cells, self.tier_of_head.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        code = libllama.llama_set_kv_tiers(ctx, ctypes.byref(params))
        if code == -1:
            raise NativeError("this model or context cannot have a tiered KV cache (it needs a plain KV cache: no "
                              "sliding-window, recurrent or hybrid layers, no ALiBi, the same KV heads in every "
                              "layer, one KV stream)")
        check_kv(code, "set_kv_tiers")


def clear_tiers(ctx: ctypes.c_void_p) -> None:
    """Give the context back the plain KV cache it was created with (the cached tokens are dropped)."""
    check_kv(libllama.llama_set_kv_tiers(ctx, None), "set_kv_tiers")


def n_tiers(memory: ctypes.c_void_p) -> int:
    """Tiers of a context's memory (``llama_get_memory``): 0 for a plain cache."""
    return int(libllama.llama_memory_n_tiers(memory))
