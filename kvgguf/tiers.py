"""Tiered KV caches: the KV heads of each layer in tiers of different lengths (patches/0012, llama_set_kv_tiers).

A plain llama.cpp cache gives every (layer, KV head) the same number of cells. KVzip's budgets are very unequal
per head (docs/profiles/): a few heads need most of the context, most need little. In a tiered cache each tier
is a KV cache of its own size holding only the heads assigned to it; every token gets a cell in every tier, and
each tier is evicted and compacted on its own, so the heads that keep little can live in a small tier.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._native import KVTierParams, NativeError, check_kv, libllama, llama_cpp_api
from .engine import KVCacheView, KVStats
from .scores import select_topk

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


class TieredEngine:
    """The eviction engine of a sequence in a tiered KV cache (the plain cache's is ``EvictionEngine``).

    Policies score a plain cache's cells; here every tier has cells of its own, and after a head-granular
    eviction a tier's cell holds a different token per head. So the sequence is seen as its **tokens**: the
    positions that some head of some tier holds (``cache.positions()``), and scores are per (layer, KV head,
    token), ``-inf`` where the head does not hold the token. Each tier is then evicted on its own to its own
    number of cells: per head (each head of the tier keeps its best tokens) or per cell (the cells whose best
    head scores best). ``CellState`` arrays follow the tokens that stay.
    """

    def __init__(self, ctx: ctypes.c_void_p, seq_id: int, layout: KVTierLayout, keep_fraction: npt.ArrayLike,
                 stats: KVStats) -> None:
        self.ctx = ctx
        self.seq_id = seq_id
        self.layout = layout
        self.n_layer, self.n_head_kv = layout.tier_of_head.shape
        # the share of a head's evictable tokens that tier t keeps (the tier's level over the planned context)
        self.keep_fraction = np.asarray(keep_fraction, dtype=np.float64)
        self.heads = [layout.heads(t) for t in range(layout.n_tiers)]
        self.views = [KVCacheView(ctx, seq_id, t, n_lists=len(self.heads[t])) for t in range(layout.n_tiers)]
        self.capacity = np.asarray(layout.n_cells, dtype=np.int64)
        self.cache = _TieredCacheView(self)
        # the plain engine's: counts over the model's life, in whole cells of every (layer, KV head)
        self.stats = stats
        self.bytes_per_head_cell = stats.bytes_per_cell // stats.n_pairs
        # per tier: the tokens the first cells hold per head of the tier, [n_heads, n] (None: every cell holds
        # its own position in every head)
        self._tokens: list[npt.NDArray[np.int32] | None] = [None] * layout.n_tiers
        self.last_kept = None

    # --- what the tiers hold ------------------------------------------------------------------------------------

    def tier_cells(self) -> npt.NDArray[np.int64]:
        return np.array([view.n_cells() for view in self.views], dtype=np.int64)

    def room(self) -> int:
        """Tokens that fit before some tier is full."""
        return int((self.capacity - self.tier_cells()).min())

    def tier_tokens(self, tier: int) -> npt.NDArray[np.int32]:
        """[n_heads of the tier, n_cells of the tier]: the position of the token each (head, cell) holds."""
        cells = self.views[tier].positions()
        tokens = np.broadcast_to(cells, (len(self.heads[tier]), cells.size)).copy()
        mixed = self._tokens[tier]
        if mixed is not None:
            tokens[:, :mixed.shape[1]] = mixed
        return tokens

    def positions(self) -> npt.NDArray[np.int32]:
        """The tokens some head of some tier holds, ascending."""
        return np.unique(np.concatenate([self.tier_tokens(t).ravel() for t in range(self.layout.n_tiers)]))

    def union_scores(self, tier_scores: list[npt.NDArray[np.float32]],
                     positions: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """Per-tier scores of the tiers' cells ([n_layer, n_head_kv, n_cells of the tier] each, as the tap gives
        them; cells past the tier's tokens are ignored) as scores of ``positions`` ([n_layer, n_head_kv, n]):
        ``-inf`` where a head does not hold the token."""
        out = np.full((self.n_layer, self.n_head_kv, positions.size), -np.inf, dtype=np.float32)
        for tier, scores in enumerate(tier_scores):
            tokens = self.tier_tokens(tier)
            index = np.searchsorted(positions, tokens)
            layers, heads = self.heads[tier][:, 0, None], self.heads[tier][:, 1, None]
            out[layers, heads, index] = scores[layers, heads, np.arange(tokens.shape[1])]
        return out

    # --- eviction -----------------------------------------------------------------------------------------------

    def keep_leaving(self, n_free: int) -> npt.NDArray[np.int64]:
        """Cells each tier keeps so that ``n_free`` more tokens fit."""
        return self.capacity - n_free

    def keep_budget(self, settings: object, n_protected: int, n_tokens: int, cap_free: int) -> npt.NDArray[np.int64]:
        """Cells each tier keeps at its budget for a sequence of ``n_tokens`` tokens (the first ``n_protected``
        and the recent window kept everywhere), leaving at least ``cap_free`` cells free. The tiers' shares
        were planned from the settings (``plan_tiers``)."""
        n_protected = min(n_tokens, n_protected + getattr(settings, "window", 0))
        evictable = max(0, n_tokens - n_protected)
        budget = n_protected + np.ceil(self.keep_fraction * evictable).astype(np.int64)
        return np.minimum(budget, self.capacity - cap_free)

    def needs_eviction(self, n_keep: npt.ArrayLike) -> bool:
        return bool((self.tier_cells() > np.broadcast_to(n_keep, self.capacity.shape)).any())

    def evict(self, positions: npt.NDArray[np.int32], scores: npt.NDArray[np.float32], n_keep: npt.ArrayLike,
              protect: npt.NDArray[np.bool_], score_s: float = 0.0, states: tuple = (), compact: bool = True,
              per_head: bool = True) -> int:
        """Keep ``n_keep[t]`` cells of each tier t; ``scores`` and ``protect`` are over ``positions`` (the
        tokens, ``[n_layer, n_head_kv, n]`` or ``[n]``). Returns the cells freed over all tiers."""
        t0 = time.perf_counter()
        n_keep = np.broadcast_to(np.asarray(n_keep, dtype=np.int64), self.capacity.shape)
        attended_before = self.cache.n_attended()
        cells_before = int(self.tier_cells().sum())
        freed = 0
        select_s = 0.0
        for tier, view in enumerate(self.views):
            tokens = self.tier_tokens(tier)
            n_cells = tokens.shape[1]
            k = int(max(1, n_keep[tier]))
            if k >= n_cells:
                continue
            t1 = time.perf_counter()
            index = np.searchsorted(positions, tokens)
            if scores.ndim == 3:
                layers, heads = self.heads[tier][:, 0, None], self.heads[tier][:, 1, None]
                tier_scores = scores[layers, heads, index]
            else:
                tier_scores = scores[index]
            # a cell is protected when it holds a protected token in some head (sinks, template head and recent
            # tokens are kept by every head, so they sit in the same cells of every head)
            cell_protected = protect[index].any(axis=0)
            k = max(k, int(cell_protected.sum()))
            if k >= n_cells:
                continue
            if per_head and scores.ndim == 3:
                kept = select_topk(tier_scores, k, cell_protected)
            else:
                kept = np.broadcast_to(select_topk(tier_scores.max(axis=0), k, cell_protected), (tokens.shape[0], k))
            kept = kept.astype(np.intp)
            held = np.take_along_axis(tokens, kept, axis=1)  # the tokens each head keeps
            # llama.cpp names a cell by its position (a head-mixed cell's: the largest of its tokens)
            cells = np.take_along_axis(np.broadcast_to(view.positions(), tokens.shape), kept, axis=1)
            select_s += time.perf_counter() - t1
            freed_here = view.compact(cells)
            self.stats.freed(freed_here, len(self.heads[tier]))
            freed += freed_here
            self._tokens[tier] = held if (held != held[:1]).any() else None
        t2 = time.perf_counter()
        kept_positions = self.positions()
        kept_index = np.searchsorted(positions, kept_positions).astype(np.int32)
        self.last_kept = kept_index
        for state in states:
            state.keep(kept_index, positions.size)

        stats = self.stats
        stats.evictions += 1
        stats.cells_before = cells_before
        stats.cells_after = int(self.tier_cells().sum())
        stats.attended_before = attended_before
        stats.attended_after = self.cache.n_attended()
        stats.score_s += score_s
        stats.evict_s += select_s
        stats.compact_s += (t2 - t0) - select_s
        stats.history.append({"cells_before": cells_before, "cells_after": stats.cells_after, "freed": freed,
                              "granularity": "head" if per_head and scores.ndim == 3 else "token",
                              "compacted": True, "tier_cells": self.tier_cells().tolist()})
        return freed

    # --- what the plain engine offers too -----------------------------------------------------------------------

    def head_positions(self, positions: npt.NDArray[np.int32]) -> None:
        """Scores over tokens need no per-head layout: None."""
        return None

    def layout_state(self) -> list[npt.NDArray[np.int32] | None]:
        """Which token each head of each tier holds in its first cells (for a snapshot)."""
        return [None if tokens is None else tokens.copy() for tokens in self._tokens]

    def restore_layout(self, state: list[npt.NDArray[np.int32] | None] | None) -> None:
        """After a state load: the tiers' per-head tokens again, their head-mixed cells marked (the state
        format keeps one position per cell, not the flag)."""
        self._tokens = [None] * self.layout.n_tiers if state is None else [
            None if tokens is None else np.ascontiguousarray(tokens, dtype=np.int32) for tokens in state]
        for tier, tokens in enumerate(self._tokens):
            if tokens is not None:
                mixed = (tokens != tokens[:1]).any(axis=0)
                if mixed.any():
                    self.views[tier].set_mixed(tokens[:, mixed].max(axis=0))

    def mixed_tokens(self) -> npt.NDArray[np.int32]:
        """The positions of every token that a head-mixed cell of some tier holds, ascending."""
        found = [np.unique(tokens[:, (tokens != tokens[:1]).any(axis=0)]) for tokens in self._tokens
                 if tokens is not None]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int32)

    def shift_layout(self, p0: int, p1: int, delta: int) -> None:
        for tokens in self._tokens:
            if tokens is not None:
                tokens[(tokens >= p0) & (tokens < p1)] += delta

    def forget_layout(self) -> None:
        self._tokens = [None] * self.layout.n_tiers

    def kv_bytes(self) -> tuple[int, int]:
        """Bytes the sequence's cells hold now, and bytes the tiers allocated."""
        held = sum(view.n_cells() * len(heads) for view, heads in zip(self.views, self.heads))
        allocated = int(libllama.llama_memory_size(llama_cpp_api.llama_get_memory(self.ctx)))
        return held * self.bytes_per_head_cell, allocated


class _TieredCacheView:
    """What the controller reads of a plain cache's ``KVCacheView``, over a tiered sequence's tokens."""

    def __init__(self, engine: TieredEngine) -> None:
        self._engine = engine

    @property
    def memory(self) -> ctypes.c_void_p:
        return llama_cpp_api.llama_get_memory(self._engine.ctx)

    def positions(self) -> npt.NDArray[np.int32]:
        return self._engine.positions()

    def n_cells(self) -> int:
        """Tokens some head holds."""
        return int(self._engine.positions().size)

    def n_attended(self) -> int:
        return max(view.n_attended() for view in self._engine.views)

    def can_compact_per_head(self) -> bool:
        return all(view.can_compact_per_head() for view in self._engine.views)

    def n_mixed(self, p0: int = -1, p1: int = -1) -> int:
        return sum(view.n_mixed(p0, p1) for view in self._engine.views)


@dataclass(frozen=True)
class TierPlan:
    """A tiered cache for a policy: its layout, and the share of the evictable tokens each tier keeps."""

    layout: KVTierLayout
    keep_fraction: npt.NDArray[np.float64]  # [n_tiers]


def _merged(n_cells: list[int], fractions: list[float], tier_of: npt.NDArray[np.int64]) -> TierPlan:
    """One tier per distinct (cells, fraction); tiers ordered by size, largest first."""
    keys = sorted(set(zip(n_cells, fractions)), reverse=True)
    index = {key: i for i, key in enumerate(keys)}
    remap = np.array([index[(n, f)] for n, f in zip(n_cells, fractions)], dtype=np.int32)
    return TierPlan(KVTierLayout(tuple(n for n, _ in keys), remap[tier_of]),
                    np.array([f for _, f in keys], dtype=np.float64))


def plan_budget_tiers(budgets: npt.NDArray[np.integer], n_evictable: int, n_ctx: int, n_extra: int,
                      n_tiers: int) -> TierPlan:
    """Tiers for per-(layer, KV head) ``budgets`` (tokens kept out of ``n_evictable``): grouped into at most
    ``n_tiers`` levels (``head_profile.group_into_tiers``), each tier holding its level plus ``n_extra`` cells
    (the protected ones, a prefill piece, a policy's scoring reserve), at most ``n_ctx``."""
    from .head_profile import group_into_tiers  # (head_profile imports contexts, which imports the engine)

    grouped = group_into_tiers(budgets, n_tiers)
    levels = [int(level) for level in grouped.levels]
    n_cells = [max(1, min(n_ctx, level + n_extra)) for level in levels]
    fractions = [min(1.0, level / max(1, n_evictable)) for level in levels]
    return _merged(n_cells, fractions, grouped.tier_of)


def plan_full_heads(ranking: npt.NDArray[np.integer], shape: tuple[int, int], keep: float, n_ctx: int,
                    n_extra: int) -> TierPlan:
    """Two tiers for head-level compression (KVzip's context-independent mode, DuoAttention): the heads ranked
    first keep the whole context, the others only what ``n_extra`` holds (sinks, recent window, one prefill
    piece). As many full heads as make the cache about ``keep`` of a plain one, at least one."""
    n_pairs = shape[0] * shape[1]
    small = min(n_ctx, n_extra)
    n_full = round((keep * n_pairs * n_ctx - n_pairs * small) / max(1, n_ctx - small)) if n_ctx > small else n_pairs
    n_full = int(min(n_pairs, max(1, n_full)))
    tier_of = np.ones(n_pairs, dtype=np.int64)
    tier_of[np.asarray(ranking)[:n_full]] = 0
    if n_full == n_pairs:
        return TierPlan(KVTierLayout((n_ctx,), np.zeros(shape, dtype=np.int32)), np.ones(1))
    return TierPlan(KVTierLayout((n_ctx, small), tier_of.reshape(shape)), np.array([1.0, 0.0]))
